"""Jane Austen's six novels from Debian's `r-cran-janeaustenr`, read without R.

The package stores them in an R lazy-load database `janeaustenr/data/Rdata.rdb`: a sequence of
records, each a 4-byte big-endian length and a zlib stream holding one R object in XDR
serialization. Each novel is a character vector (one string per line of the book).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .errors import UserError
from .hub import cache_dir

# First line of each book -> name used here.
TITLES = {
    "EMMA": "emma",
    "MANSFIELD PARK": "mansfieldpark",
    "NORTHANGER ABBEY": "northangerabbey",
    "PERSUASION": "persuasion",
    "PRIDE AND PREJUDICE": "prideprejudice",
    "SENSE AND SENSIBILITY": "sensesensibility",
}

CALIBRATION = ("sensesensibility", "prideprejudice")
EVALUATION = ("emma", "persuasion")

SEARCH = [
    Path("/usr/lib/R/site-library"),
    Path("/usr/local/lib/R/site-library"),
    Path("/usr/lib/R/library"),
]


def find_database() -> Path:
    """Rdata.rdb of the installed package, or of the copy `make` unpacks into the cache."""
    for root in [*SEARCH, cache_dir() / "janeaustenr" / "usr/lib/R/site-library"]:
        path = root / "janeaustenr" / "data" / "Rdata.rdb"
        if path.is_file():
            return path
    raise UserError(
        "Jane Austen's novels were not found: install Debian's r-cran-janeaustenr "
        "(apt-get install r-cran-janeaustenr, or run 'make setup'), or pass --calib PATH"
    )


def _strings(blob: bytes) -> list[str]:
    """Decode one serialized R character vector."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR-serialized R object")
    pos = 2
    version = struct.unpack(">i", blob[pos : pos + 4])[0]
    pos += 12  # version, writer version, minimal reader version
    if version == 3:
        pos += 4 + struct.unpack(">i", blob[pos : pos + 4])[0]  # native encoding name
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"R object of type {flags & 0xFF}, expected a character vector (16)")
    lines = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        lines.append("" if n < 0 else blob[pos : pos + n].decode("utf-8", "replace"))
        pos += max(n, 0)
    return lines


def novels(path: Path | None = None) -> dict[str, str]:
    """All six novels, name -> full text (lines joined with newlines)."""
    data = (path or find_database()).read_bytes()
    books: dict[str, str] = {}
    pos = 0
    while pos + 4 < len(data):
        stream = zlib.decompressobj()
        blob = stream.decompress(data[pos + 4 :])
        pos = len(data) - len(stream.unused_data)
        lines = _strings(blob)
        title = next(line for line in lines if line.strip()).strip().upper()
        if title in TITLES:
            books[TITLES[title]] = "\n".join(lines)
    missing = set(TITLES.values()) - set(books)
    if missing:
        raise UserError(f"the janeaustenr database lacks {', '.join(sorted(missing))}: reinstall r-cran-janeaustenr")
    return books


def text(split: str) -> str:
    """'calibration' (Sense and Sensibility + Pride and Prejudice) or 'evaluation' (Emma + Persuasion)."""
    names = CALIBRATION if split == "calibration" else EVALUATION
    books = novels()
    return "\n\n".join(books[n] for n in names)
