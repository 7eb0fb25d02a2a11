"""The native binary COPY encoder (projections/_copy_binary.c) against psycopg's own binary COPY
formatting of the same rows and types: the same bytes, or an error where psycopg would not
write the value as given."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from psycopg import postgres
from psycopg._copy_base import BinaryFormatter  # the reference: how psycopg's COPY writes rows
from psycopg.adapt import Transformer
from psycopg.pq import Format

from projections import _copy_binary, batch_writer
from projections.batch_writer import _STAGE_LAYOUT, _STAGE_TYPES
from projections.read_models import RecipientRow


def psycopg_bytes(rows: list[Any], types: tuple[str, ...] = _STAGE_TYPES) -> bytes:
    transformer = Transformer()
    transformer.set_dumper_types([postgres.types[t].oid for t in types], Format.BINARY)
    formatter = BinaryFormatter(transformer)
    out = bytearray()
    for row in rows:
        out += formatter.write_row(row)
    out += formatter.end()
    return bytes(out)


ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11)),
         timezone(timedelta(hours=-3, minutes=-30, seconds=-7, microseconds=-9)),
         ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")]
TEXTS = ["", "acme", "é", "ünïcødé ✉", "😀 emoji", "tab\there", "quote\"back\\slash", "x" * 300]


def random_row(rng: random.Random) -> RecipientRow:
    def text() -> str:
        return rng.choice(TEXTS) + str(rng.randrange(1000))

    moment = datetime(rng.randrange(1, 10000), rng.randrange(1, 13), rng.randrange(1, 29),
                      rng.randrange(24), rng.randrange(60), rng.randrange(60),
                      rng.randrange(1_000_000), tzinfo=rng.choice(ZONES))
    return RecipientRow(text(), text(), text(), text(), rng.choice(["sent", "failed"]),
                        rng.choice([0, 1, -1, 2**31 - 1, -(2**31), rng.randrange(100)]),
                        rng.choice([None, text()]), rng.choice([None, text()]),
                        rng.choice([None, 250, -421, 0]), rng.randrange(3), moment)


def test_random_rows_are_the_bytes_psycopg_writes() -> None:
    rng = random.Random(20261130)
    rows = [random_row(rng) for _ in range(5_000)]
    assert _copy_binary.encode_rows(rows, _STAGE_LAYOUT) == psycopg_bytes(rows)


@pytest.mark.parametrize("moment", [
    datetime(1, 1, 1, tzinfo=UTC), datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 2, 29, 12, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=timezone(timedelta(hours=14))),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),  # a gap
    datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),  # a fold
])
def test_edge_moments(moment: datetime) -> None:
    row = RecipientRow("t", "c", "k", "e", "sent", 1, None, None, None, 0, moment)
    assert _copy_binary.encode_rows([row], _STAGE_LAYOUT) == psycopg_bytes([row])


def test_no_rows_is_signature_and_trailer() -> None:
    assert _copy_binary.encode_rows([], _STAGE_LAYOUT) == psycopg_bytes([])


@pytest.mark.parametrize("field, value, error", [
    (0, "nul\x00inside", ValueError),
    (0, "lone \udc80 surrogate", ValueError),  # UnicodeEncodeError
    (0, 42, TypeError),
    (5, 2**31, OverflowError),
    (5, -(2**31) - 1, OverflowError),
    (5, 2**70, OverflowError),
    (5, True, TypeError),
    (5, 1.0, TypeError),
    (10, datetime(2026, 1, 1), TypeError),  # naive  # noqa: DTZ001
    (10, "2026-01-01T00:00:00Z", TypeError),
])
def test_values_it_does_not_take_raise(field: int, value: Any, error: type[Exception]) -> None:
    values = list(RecipientRow("t", "c", "k", "e", "sent", 1, None, None, None, 0,
                               datetime(2026, 1, 1, tzinfo=UTC)))
    values[field] = value
    with pytest.raises(error):
        _copy_binary.encode_rows([tuple(values)], _STAGE_LAYOUT)


def test_malformed_calls_raise() -> None:
    with pytest.raises(TypeError):
        _copy_binary.encode_rows([("too", "short")], _STAGE_LAYOUT)
    with pytest.raises(ValueError):
        _copy_binary.encode_rows([], "tx")
    with pytest.raises(TypeError):
        _copy_binary.encode_rows((), _STAGE_LAYOUT)  # type: ignore[arg-type]


def test_the_batch_writer_falls_back_to_psycopg_on_such_values() -> None:
    good = RecipientRow("t", "c", "k", "e", "sent", 1, None, None, None, 0,
                        datetime(2026, 1, 1, tzinfo=UTC))
    assert batch_writer._copy_data([good]) == psycopg_bytes([good])
    assert batch_writer._copy_data([good._replace(attempts=2**40)]) is None


class RecordingCopy:
    """Stands in for a psycopg Copy: records how the rows were sent."""

    def __init__(self, encoding: str) -> None:
        self.connection = SimpleNamespace(info=SimpleNamespace(encoding=encoding))
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def set_types(self, types: Any) -> None:
        self.calls.append(("set_types", tuple(types)))

    def write_row(self, row: Any) -> None:
        self.calls.append(("write_row", row))


def test_the_encoded_rows_go_in_one_write_on_a_utf8_connection_only() -> None:
    row = RecipientRow("t", "c", "k", "é", "sent", 1, None, None, None, 0,
                       datetime(2026, 1, 1, tzinfo=UTC))
    data = batch_writer._copy_data([row])
    assert data is not None
    utf8 = RecordingCopy("utf-8")
    batch_writer._copy_rows(utf8, [row], data)  # type: ignore[arg-type]
    assert utf8.calls == [("write", data)]
    latin = RecordingCopy("iso8859-1")
    batch_writer._copy_rows(latin, [row], data)  # type: ignore[arg-type]
    assert latin.calls == [("set_types", _STAGE_TYPES), ("write_row", row)]
    missing = RecordingCopy("utf-8")
    batch_writer._copy_rows(missing, [row], None)  # type: ignore[arg-type]
    assert missing.calls == [("set_types", _STAGE_TYPES), ("write_row", row)]
