"""Turning zeros into savings: CompactLinear (linear.py), structured columns removed (shrink.py),
N:M rows packed as values + positions (pack.py), and the plain Hugging Face form where every MLP
is narrowed alike (plain.py)."""
