"""projections/_copy_binary.c: rows of plain values as PostgreSQL binary COPY data."""

from typing import Any

def encode_rows(rows: list[Any], layout: str, /) -> bytes: ...  # rows: tuples, layout's length
