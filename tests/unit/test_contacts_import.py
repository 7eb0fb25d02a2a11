"""CSV parsing and validation of the contact import, its direct envelope encoder and the pure
parts of its modes (skip-existing, blocklist): no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from schemas.contacts import ContactDeleted, ContactSuppressed, ContactUpserted, contact_id_for, contact_key
from schemas.envelope import decode, encode, wrap
from services.cli.contacts_import import (
    BLOCKLIST_DETAIL,
    IMPORT_MODES,
    MAX_FIELD_CHARS,
    ContactUpsertEncoder,
    CsvImportError,
    ImportReport,
    ParsedRow,
    RandomIds,
    RejectedRow,
    _Acknowledgements,
    _Rejections,
    import_contacts,
    parse_rows,
    suppression_envelope,
    track_existing,
)
from services.common.settings import Settings


def lines(text: str | bytes) -> list[str]:
    """Lines as import_contacts feeds them: undecodable bytes become lone surrogates."""
    raw = text.encode() if isinstance(text, str) else text
    return raw.decode("utf-8", "surrogateescape").splitlines(keepends=True)


def parse(text: str | bytes) -> list[ParsedRow | RejectedRow]:
    return list(parse_rows(lines(text)))


def rejected(items: list[ParsedRow | RejectedRow]) -> list[tuple[int, str]]:
    return [(r.line, r.reason) for r in items if isinstance(r, RejectedRow)]


def good(items: list[ParsedRow | RejectedRow]) -> list[ParsedRow]:
    return [r for r in items if isinstance(r, ParsedRow)]


def test_good_rows_are_normalised_with_names_attributes_and_lists():
    rows = parse(
        "email,first_name,last_name,city,Plan,lists\r\n"
        " Ann@Example.COM ,Ann , Lee,Paris,pro,l1; l2;;l1\r\n"
        "bob@example.org,,,,,\r\n"
    )
    assert rows == [
        ParsedRow(2, "Ann@example.com", "Ann", "Lee", {"city": "Paris", "Plan": "pro"}, ["l1", "l2"]),
        ParsedRow(3, "bob@example.org", "", "", {"city": "", "Plan": ""}, []),
    ]


def test_email_is_the_only_required_column_and_header_names_are_case_insensitive():
    assert parse("EMAIL\na@example.com\n") == [ParsedRow(2, "a@example.com")]


def test_each_kind_of_bad_row_is_rejected_with_its_line_and_good_rows_survive():
    text = (
        "email,first_name,note\n"            # 1
        "ok1@example.com,A,x\n"              # 2
        "not-an-address,B,x\n"               # 3
        ",C,x\n"                             # 4
        "ok2@example.com,D\n"                # 5 too few fields
        "ok3@example.com,E,x,extra\n"        # 6 too many fields
        f"ok4@example.com,F,{'y' * (MAX_FIELD_CHARS + 1)}\n"  # 7
        f"ok5@example.com,{'n' * 201},x\n"   # 8 name longer than the schema allows
        "ok6@example.com,G,x\n"              # 9
    )
    items = parse(text)
    assert [r.email for r in good(items)] == ["ok1@example.com", "ok6@example.com"]
    reasons = dict(rejected(items))
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8]
    assert "not a valid e-mail address" in reasons[3]
    assert reasons[4] == "empty email"
    assert reasons[5] == "expected 3 fields, found 2"
    assert reasons[6] == "expected 3 fields, found 4"
    assert "'note' is longer than 1000 characters" in reasons[7]
    assert "limited to 200 characters" in reasons[8]


def test_invalid_utf8_rejects_only_its_row():
    raw = b"email,city\na@example.com,Z\xc3\xbcrich\nb@example.com,Z\xfcrich\nc@example.com,x\n"
    items = parse(raw)
    assert [(r.line, r.attributes["city"]) for r in good(items)] == [(2, "Zürich"), (4, "x")]
    assert rejected(items) == [(3, "not valid UTF-8")]


def test_line_numbers_follow_physical_lines_across_quoted_newlines_and_blank_lines():
    text = (
        "email,note\n"                       # 1
        'a@example.com,"two\nlines"\n'       # 2-3
        "\n"                                 # 4 blank: skipped
        "bad,x\n"                            # 5
        'b@example.com,"three\n\nlines"\n'   # 6-8
        "also bad,y\n"                       # 9
    )
    items = parse(text)
    assert [(r.line, r.attributes["note"]) for r in good(items)] == [
        (2, "two\nlines"), (6, "three\n\nlines")
    ]
    assert [line for line, _ in rejected(items)] == [5, 9]


def test_bom_at_file_start_is_ignored():
    items = parse("\ufeffemail,first_name\na@example.com,A\n")
    assert items == [ParsedRow(2, "a@example.com", "A")]


def test_invalid_list_id_rejects_the_row():
    items = parse("email,lists\na@example.com,ok;bad id\n")
    assert rejected(items) == [(2, "invalid list id 'bad id'")]


def test_duplicate_addresses_are_kept_as_upserts_of_one_contact():
    items = good(parse("email\na@Example.com\na@example.COM\nA@example.com\n"))
    # The domain is case-insensitive, the local part is not (RFC 5321).
    assert [r.email for r in items] == ["a@example.com", "a@example.com", "A@example.com"]
    assert len({contact_id_for("acme", r.email) for r in items}) == 2


def test_unnamed_columns_are_ignored_not_attributes():
    assert parse("email,\na@example.com,\n") == [ParsedRow(2, "a@example.com")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("first_name,last_name\nA,B\n", "no 'email' column"),
        ("\n", "header"),
        ("email,Email\na@example.com,b@example.com\n", "appears twice"),
        (b"email,\xff\n", "not valid UTF-8"),
    ],
)
def test_an_unusable_header_rejects_the_whole_file(text, message):
    with pytest.raises(CsvImportError, match=message):
        parse(text)


def test_malformed_csv_rejects_the_row_and_parsing_continues():
    # A field beyond the csv module's own limit (128 KiB) is a csv.Error, not a crash.
    items = parse(f"email,note\na@example.com,{'x' * 200_000}\nb@example.com,z\n")
    assert [(r.line, r.email) for r in good(items)] == [(3, "b@example.com")]
    [(line, reason)] = rejected(items)
    assert line == 2 and reason.startswith("malformed CSV: field larger than field limit")


def test_parse_is_lazy_so_memory_stays_constant():
    def endless():
        yield "email\n"
        n = 0
        while True:
            n += 1
            yield f"u{n}@example.com\n"

    rows = parse_rows(endless())
    first = [next(rows) for _ in range(3)]
    assert [r.line for r in first] == [2, 3, 4]


# --- the direct encoder -----------------------------------------------------------------------


@pytest.mark.parametrize("microsecond", [0, 5000, 123456])
def test_direct_encoder_writes_the_same_bytes_as_the_pydantic_path(microsecond):
    row = ParsedRow(
        7, "Ann.Lee@example.com", 'Ann "the" \\ \u00e9\u2028', "L\x01\n\t",
        {"city": "Zürich", "quote": '"', "empty": ""}, ["l1", "l2"],
    )
    tenant = "acme"
    contact_id = contact_id_for(tenant, row.email)
    message_id = uuid.uuid4()
    moment = datetime(2025, 3, 4, 5, 6, 7, microsecond, tzinfo=UTC)
    direct = ContactUpsertEncoder(tenant).encode(
        contact_id, row, ["main", *row.lists], message_id=message_id, occurred_at=moment
    )
    payload = ContactUpserted(
        contact_id=contact_id, email=row.email, first_name=row.first_name, last_name=row.last_name,
        attributes=row.attributes, lists=["main", *row.lists],
    )
    expected = encode(wrap(payload, tenant_id=tenant, aggregate_id=contact_id, message_id=message_id,
                           occurred_at=moment))
    assert direct == expected
    message = decode(direct)
    assert message.payload == payload and message.envelope.correlation_id == message_id


def test_direct_encoder_envelopes_validate_with_generated_ids_and_clock():
    encoder = ContactUpsertEncoder("acme")
    row = ParsedRow(2, "a@example.com")
    seen = set()
    for _ in range(50):
        message = decode(encoder.encode(contact_id_for("acme", row.email), row, []))
        assert message.envelope.id == message.envelope.correlation_id
        seen.add(message.envelope.id)
    assert len(seen) == 50


def test_random_ids_are_version_4_uuids():
    ids = RandomIds()
    values = [ids.next() for _ in range(RandomIds.BLOCK + 10)]  # crosses a block boundary
    assert len(set(values)) == len(values)
    for value in values:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_encoder_refuses_an_invalid_tenant():
    with pytest.raises(ValueError):
        ContactUpsertEncoder("bad tenant")


# --- modes (pure parts) -----------------------------------------------------------------------


def test_an_unknown_mode_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(CsvImportError, match="unknown import mode 'merge'"):
        import_contacts(tmp_path / "absent.csv", tenant_id="acme", list_id=None, settings=Settings(),
                        mode="merge")
    assert IMPORT_MODES == ("upsert", "skip-existing", "blocklist")


def test_a_blocklist_import_refuses_a_list(tmp_path):
    with pytest.raises(CsvImportError, match="adds no list memberships"):
        import_contacts(tmp_path / "absent.csv", tenant_id="acme", list_id="news", settings=Settings(),
                        mode="blocklist")


def test_suppression_envelope_is_a_manual_blocklist_caused_by_the_upsert():
    contact_id = contact_id_for("acme", "a@example.com")
    upsert_id = uuid.uuid4()
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = decode(suppression_envelope("acme", contact_id, upsert_id, moment))
    assert message.payload == ContactSuppressed(contact_id=contact_id, reason="manual_blocklist",
                                                detail=BLOCKLIST_DETAIL)
    env = message.envelope
    assert (env.tenant_id, env.aggregate_id, env.occurred_at) == ("acme", contact_id, moment)
    assert env.correlation_id == env.causation_id == upsert_id != env.id
    # The upsert written before it has no lists and carries that id.
    upsert = decode(ContactUpsertEncoder("acme").encode(contact_id, ParsedRow(2, "a@example.com"), [],
                                                        message_id=upsert_id, occurred_at=moment))
    assert upsert.envelope.id == upsert_id and upsert.payload.lists == []


def _record(tenant: str, payload) -> tuple[bytes, bytes]:
    cid = payload.contact_id
    return contact_key(tenant, cid), encode(wrap(payload, tenant_id=tenant, aggregate_id=cid))


def test_track_existing_follows_upserts_and_deletions_of_one_tenant_only():
    a, b, c = (contact_id_for("acme", f"{x}@example.com") for x in "abc")
    other = contact_id_for("other", "z@example.com")
    records = [
        _record("acme", ContactUpserted(contact_id=a, email="a@example.com")),
        _record("acme", ContactUpserted(contact_id=b, email="b@example.com")),
        _record("acme", ContactSuppressed(contact_id=c, reason="complaint")),  # no upsert: not present
        _record("other", ContactUpserted(contact_id=other, email="z@example.com")),
        _record("acme", ContactDeleted(contact_id=b)),
        (contact_key("acme", c), b"{not json"),  # unreadable: ignored
        (None, b"{}"),
        (contact_key("acme", c), None),
        # a tenant whose name starts with ours is another tenant
        _record("acme2", ContactUpserted(contact_id=c, email="c@example.com")),
    ]
    existing: set[str] = set()
    for key, value in records:
        track_existing(existing, "acme", key, value)
    assert existing == {a}
    track_existing(existing, "acme", *_record("acme", ContactUpserted(contact_id=b, email="b@example.com")))
    assert existing == {a, b}


class _Err:
    def str(self) -> str:
        return "Broker: timed out"


@pytest.mark.parametrize(
    ("first", "second", "acked", "rejected_lines"),
    [
        (None, None, 1, []),
        (_Err(), None, 0, [5]),
        (None, _Err(), 0, [5]),
        (_Err(), _Err(), 0, [5]),  # rejected once, not twice
    ],
)
def test_a_row_of_two_records_counts_once_both_are_acknowledged(first, second, acked, rejected_lines):
    rejections = _Rejections()
    acks = _Acknowledgements(rejections)
    on_upsert, on_suppressed = acks.for_pair(5)
    on_upsert(first, None)
    assert acks.acked == 0
    on_suppressed(second, None)
    assert acks.acked == acked
    assert [r.line for r in rejections.kept] == rejected_lines == [5] * rejections.count
    if rejected_lines:
        assert rejections.kept[0].reason == "not acknowledged by Kafka: Broker: timed out"


def test_report_counts_skipped_rows_in_the_rate():
    report = ImportReport(imported=10, rejected=[], seconds=2.0, rejected_count=2, skipped=8)
    assert report.rows_per_second == 10.0
    assert ImportReport(1, [], 1.0, 0).skipped == 0
