"""Turning zeros into savings: shrunk (columns removed) and packed (N:M values + metadata) linears."""

from .linear import CompactLinear
from .pack import pack_model
from .shrink import shrink_model

__all__ = ["CompactLinear", "pack_model", "shrink_model"]
