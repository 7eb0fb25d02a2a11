"""projections/_copy_binary.c: rows of plain values as PostgreSQL binary COPY data."""

from collections.abc import Sequence

def encode_rows(rows: list[Sequence[object]], layout: str, /) -> bytes: ...
