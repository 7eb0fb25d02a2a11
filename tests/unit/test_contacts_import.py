"""The contact import without a broker: the CSV format and its reference parser, the fast record
writer held byte for byte to the schema path (parse_rows + pydantic models + encode), ids,
delivery-failure accounting and the pure parts of the modes."""

from __future__ import annotations

import csv
import io
import random
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import KafkaError, Message

from schemas.contacts import (
    ContactDeleted,
    ContactSuppressed,
    ContactUpserted,
    apply_contact_event,
    contact_id_for,
    contact_key,
)
from schemas.envelope import decode, encode, wrap
from services.cli import contact_records
from services.cli.contact_csv import (
    MAX_FIELD_CHARS,
    CsvImportError,
    ParsedRow,
    RejectedRow,
    numbered_rows,
    parse_rows,
    read_header,
)
from services.cli.contact_records import (
    BLOCKLIST_DETAIL,
    CLOCK_EVERY_ROWS,
    LISTS_CACHE_SIZE,
    ContactIds,
    ContactRecord,
    ContactRecordWriter,
    EnvelopeIds,
    TemplateDrift,
    envelope_timestamp,
)
from services.cli.contacts_import import (
    IMPORT_MODES,
    DeliveryFailures,
    ImportReport,
    Rejections,
    import_contacts,
)
from services.cli.existing_contacts import track_existing
from services.common.settings import Settings


def lines(text: str | bytes) -> io.StringIO:
    """Lines as import_contacts reads them: only \\r and \\n end a line, and undecodable bytes
    (a lone surrogate in `text` is written as the bytes of one) become lone surrogates."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return io.StringIO(raw.decode("utf-8", "surrogateescape"), newline="")


def parse(text: str | bytes) -> list[ParsedRow | RejectedRow]:
    return list(parse_rows(lines(text)))


def rejected(items: list) -> list[tuple[int, str]]:
    return [(r.line, r.reason) for r in items if isinstance(r, RejectedRow)]


def accepted(items: Iterable[ContactRecord | RejectedRow]) -> list[ContactRecord]:
    """The records of rows that must all have been written."""
    records = []
    for item in items:
        assert not isinstance(item, RejectedRow), item
        records.append(item)
    return records


def good(items: list[ParsedRow | RejectedRow]) -> list[ParsedRow]:
    return [r for r in items if isinstance(r, ParsedRow)]


# --- the CSV format (reference parser) ----------------------------------------------------------


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


def test_attr_prefixed_columns_name_attributes_as_segments_do():
    rows = parse("email,attr.plan,Attr.Email,attr.lists\na@example.com,pro,b@example.com,x\n")
    assert rows == [ParsedRow(2, "a@example.com", attributes={"plan": "pro", "Email": "b@example.com",
                                                              "lists": "x"})]


def test_a_column_mapping_reads_another_tools_export():
    text = "E-Mail Address,Given Name,Tier,Notes,Groups\na@Example.com,Ann,pro,internal,l1;l2\n"
    columns = {"e-mail address": "email", "Given Name": "first_name", "TIER": "attr.plan", "Notes": "-",
               "Groups": "LISTS"}
    assert list(parse_rows(lines(text), columns=columns)) == [
        ParsedRow(2, "a@example.com", "Ann", attributes={"plan": "pro"}, lists=["l1", "l2"])]
    assert_same_records(text, base_lists=("all",), columns=columns)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"Mail": "email"}, "names 'Mail', which is not in the header"),
        ({"email": "phone"}, "cannot be mapped to 'phone'"),
        ({"email": "attr."}, "cannot be mapped to 'attr.'"),
        ({"city": "email"}, "appears twice"),
        ({"email": "-"}, "no 'email' column"),
    ],
)
def test_a_column_mapping_that_does_not_fit_the_header_rejects_the_file(columns, message):
    with pytest.raises(CsvImportError, match=message):
        list(parse_rows(lines("email,city\na@example.com,Paris\n"), columns=columns))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("first_name,last_name\nA,B\n", "no 'email' column"),
        ("\n", "header"),
        ("email,Email\na@example.com,b@example.com\n", "appears twice"),
        ("email,plan,attr.Plan\na@example.com,x,y\n", "'attr.Plan' appears twice"),
        ("email,attr.\na@example.com,x\n", "names no attribute"),
        (b"email,\xff\n", "not valid UTF-8"),
    ],
)
def test_an_unusable_header_rejects_the_whole_file(text, message):
    with pytest.raises(CsvImportError, match=message):
        parse(text)


def test_each_kind_of_bad_row_is_rejected_with_its_line_and_good_rows_survive():
    text = (
        "email,first_name,note,lists\n"        # 1
        "ok1@example.com,A,x,\n"               # 2
        "not-an-address,B,x,\n"                # 3 bad e-mail
        ",C,x,\n"                              # 4 empty e-mail
        "ok2@example.com,D,x\n"                # 5 missing column
        "ok3@example.com,E,x,,extra\n"         # 6 extra column
        f"ok4@example.com,F,{'y' * (MAX_FIELD_CHARS + 1)},\n"  # 7 oversized field
        f"ok5@example.com,{'n' * 201},x,\n"    # 8 name longer than the schema allows
        "ok6@example.com,G,x,ok;bad id\n"      # 9 bad list id
        "ok7@example.com,H,x,l1\n"             # 10
    )
    items = parse(text)
    assert [(r.line, r.email) for r in good(items)] == [(2, "ok1@example.com"), (10, "ok7@example.com")]
    assert rejected(items) == [
        (3, "not a valid e-mail address: 'not-an-address': An email address must have an @-sign."),
        (4, "empty email"),
        (5, "expected 4 fields, found 3"),
        (6, "expected 4 fields, found 5"),
        (7, "field 'note' is longer than 1000 characters"),
        (8, "first_name and last_name are limited to 200 characters"),
        (9, "invalid list id 'bad id'"),
    ]


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
    assert parse("\ufeffemail,first_name\na@example.com,A\n") == [ParsedRow(2, "a@example.com", "A")]


def test_duplicate_addresses_are_kept_as_upserts_of_one_contact():
    items = good(parse("email\na@Example.com\na@example.COM\n A@example.com\na+x@example.com\n"))
    # The address is kept as given (domain lower-cased) for delivery; the person is the
    # address regardless of case, so three rows are one contact; a+x is another person.
    assert [r.email for r in items] == ["a@example.com", "a@example.com", "A@example.com", "a+x@example.com"]
    assert len({contact_id_for("acme", r.email) for r in items[:3]}) == 1
    assert contact_id_for("acme", items[3].email) != contact_id_for("acme", items[0].email)


def test_unnamed_columns_are_ignored_not_attributes():
    assert parse("email,\na@example.com,\n") == [ParsedRow(2, "a@example.com")]


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
    assert [next(rows).line for _ in range(3)] == [2, 3, 4]


# --- the fast writer against the schema path ----------------------------------------------------

MOMENT = datetime(2026, 3, 4, 5, 6, 7, 80910, tzinfo=UTC)


def schema_path(text, *, tenant, base_lists, blocklist, ids, suppression_ids, moment=MOMENT, columns=None):
    """What the import must write, by the slow and obvious route: the reference parser, then
    the pydantic models, wrap and encode for each row."""
    out: list = []
    for item in parse_rows(lines(text), with_lists=not blocklist, columns=columns):
        if isinstance(item, RejectedRow):
            out.append(item)
            continue
        cid = contact_id_for(tenant, item.email)
        upsert_id = uuid.UUID(ids.for_line(item.line))
        lists = [*base_lists, *(x for x in item.lists if x not in base_lists)]
        payload = ContactUpserted(contact_id=cid, email=item.email, first_name=item.first_name,
                                  last_name=item.last_name, attributes=item.attributes, lists=lists)
        value = encode(wrap(payload, tenant_id=tenant, aggregate_id=cid, message_id=upsert_id,
                            occurred_at=moment))
        then = None
        if blocklist:
            suppressed = ContactSuppressed(contact_id=cid, reason="manual_blocklist", detail=BLOCKLIST_DETAIL)
            then = encode(wrap(suppressed, tenant_id=tenant, aggregate_id=cid,
                               message_id=uuid.UUID(suppression_ids.for_line(item.line)),
                               correlation_id=upsert_id, causation_id=upsert_id, occurred_at=moment))
        out.append((item.line, cid, contact_key(tenant, cid), value, then))
    return out


def fast_path(text, *, tenant, base_lists, blocklist, ids, suppression_ids, moment=MOMENT, columns=None):
    header, rows = numbered_rows(lines(text), columns)
    writer = ContactRecordWriter(tenant, header, base_lists=base_lists, with_row_lists=not blocklist,
                                 suppress=blocklist, ids=ids, suppression_ids=suppression_ids,
                                 clock=lambda: moment)
    return list(writer.records(rows))


def assert_same_records(text, *, tenant="acme", base_lists=(), blocklist=False, columns=None):
    ids, suppression_ids = EnvelopeIds(), EnvelopeIds()
    kwargs = dict(tenant=tenant, base_lists=list(base_lists), blocklist=blocklist, ids=ids,
                  suppression_ids=suppression_ids, columns=columns)
    expected = schema_path(text, **kwargs)
    actual = fast_path(text, **kwargs)
    assert actual == expected
    for item in actual:
        if not isinstance(item, RejectedRow):
            for value in item[3:]:
                if value is not None:
                    decode(value)  # the wire codec accepts every record
    return actual


AWKWARD = (
    'email,first_name,last_name,lists,plan,"we%ird ""name"", with comma",attr.email,empty\n'
    ' Ann@Example.COM ,Ann "q",Lee\\x,l1;l2;;l1,pro,v%s\x01\x1f,x,\n'          # escapes, % and dup lists
    "b@example.org,\u00e9l\u00e8ne,\u2028\u2029\x7f,,free,\ttab,y,\n"          # non-ASCII, separators
    'c@EXAMPLE.org,"multi\nline",, l3 ,team,"quote ""in"" value",\\,\n'         # quoted newline
    "not an address,x,y,,free,a,b,\n"                                           # bad e-mail
    ",x,y,,free,a,b,\n"                                                         # empty e-mail
    "d@example.org,x,y,,free,a,b\n"                                             # missing column
    f"e@example.org,x,y,,{'p' * (MAX_FIELD_CHARS + 1)},a,b,\n"                  # oversized field
    f"f@example.org,{'n' * 201},y,,free,a,b,\n"                                 # name too long
    "g@example.org,x,y,bad list,free,a,b,\n"                                    # bad list id
    'h@example.org,"unterminated,y,,free,a,b,\n'                                # eats the rest
)


@pytest.mark.parametrize(
    ("base_lists", "blocklist"),
    [((), False), (("all",), False), (("l1", "main"), False), ((), True)],  # a blocklist takes no list
)
def test_fast_writer_writes_the_schema_path_bytes_for_awkward_rows(base_lists, blocklist):
    actual = assert_same_records(AWKWARD, base_lists=base_lists, blocklist=blocklist)
    # A blocklist ignores the lists column, so the row with a bad list id (line 11) is good there.
    assert [item[0] for item in actual if not isinstance(item, RejectedRow)] == [2, 3, 4] + [11] * blocklist
    assert [line for line, _ in rejected(actual)] == [6, 7, 8, 9, 10] + [11] * (not blocklist) + [12]


@pytest.mark.parametrize(
    "header",
    [
        "email",                      # nothing but the address
        "lists,email",                # lists only, e-mail not first
        "email,plan",                 # one attribute
        "last_name,email,first_name",  # names, no attributes
        "email,a,b,c,d,e,f,g,h,i,j",  # many attributes
    ],
)
def test_fast_writer_matches_the_schema_path_for_every_header_shape(header):
    rng = random.Random(header)
    columns = header.split(",")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n" if len(columns) % 2 else "\n")  # both line ends
    writer.writerow(columns)
    for n in range(300):
        writer.writerow([_random_cell(rng, column, n) for column in columns])
    assert_same_records(out.getvalue(), base_lists=("all",))
    assert_same_records(out.getvalue(), blocklist=True)


# Characters that stress escaping, quoting, stripping and %-formatting (a lone \r would split
# the row: csv.writer does not quote it).
_PALETTE = ['a', 'Z', '0', ' ', '"', '\\', ',', ';', '%', '\n', '\t', '\x00', '\x01', '\x1f', '\x7f',
            '\u00e9', '\u2028', '\U0001f600', '\ufeff', '<', '@', '.']


def _random_cell(rng: random.Random, column: str, n: int) -> str:
    if column == "email":
        return rng.choice([f"u{n}@Example.com", f" u{n}@example.org ", f'"q{n}"@example.net', "bad", "",
                           f"u{n}@@example.com", f"\u00e9{n}@example.com", f"u{n}@example.c"])
    if column == "lists":
        return rng.choice(["", "l1", "l1;l2", " l2 ; l1 ;", "bad id", "all;l3", ";;"])
    kind = rng.choices(["plain", "awkward", "oversized", "undecodable"], weights=[80, 16, 2, 2])[0]
    if kind == "plain":
        return rng.choice(["", "pro", "  padded  ", f"value {n}", "2026-01-31"])
    if kind == "undecodable":
        return "x\ud83d"  # written as the bytes of a lone surrogate: not UTF-8
    size = MAX_FIELD_CHARS + 1 if kind == "oversized" else rng.choice([1, 5, 20, 200])
    return "".join(rng.choice(_PALETTE) for _ in range(size))


def test_re_import_writes_the_same_contacts_and_the_events_fold_to_the_same_state():
    text = "email,first_name,plan,lists\na@example.com,Ann,pro,l1\nb@example.com,Bob,free,l1;l2\n"
    first = [decode(r[3]) for r in fast_path(text, tenant="acme", base_lists=["all"], blocklist=False,
                                             ids=EnvelopeIds(), suppression_ids=None)]
    again = [decode(r[3]) for r in fast_path(text, tenant="acme", base_lists=["all"], blocklist=False,
                                             ids=EnvelopeIds(), suppression_ids=None,
                                             moment=MOMENT + timedelta(hours=1))]
    assert [m.payload for m in first] == [m.payload for m in again]
    assert {m.envelope.id for m in first}.isdisjoint({m.envelope.id for m in again})
    for once, twice in zip(first, again, strict=True):
        assert isinstance(once.payload, ContactUpserted) and isinstance(twice.payload, ContactUpserted)
        state = apply_contact_event(None, once.payload)
        assert apply_contact_event(state, twice.payload) == state


def test_occurred_at_follows_the_clock_every_few_thousand_rows():
    ticks = iter(MOMENT + timedelta(seconds=s) for s in range(100))
    text = "email\n" + "".join(f"u{n}@example.com\n" for n in range(CLOCK_EVERY_ROWS * 2 + 5))
    header, rows = numbered_rows(lines(text))
    writer = ContactRecordWriter("acme", header, clock=lambda: next(ticks))
    moments = [decode(r[3]).envelope.occurred_at for r in accepted(writer.records(rows))]
    assert moments[0] == MOMENT and moments[-1] == MOMENT + timedelta(seconds=2)
    assert sorted(moments) == moments and len(set(moments)) == 3


def test_lists_cache_stays_bounded_whatever_the_file():
    text = "email,lists\n" + "".join(f"u{n}@example.com,l{n}\n" for n in range(LISTS_CACHE_SIZE + 50))
    header, rows = numbered_rows(lines(text))
    writer = ContactRecordWriter("acme", header)
    records = accepted(writer.records(rows))
    last = decode(records[-1][3]).payload
    assert isinstance(last, ContactUpserted) and last.lists == [f"l{LISTS_CACHE_SIZE + 49}"]
    assert len(writer._lists_json) <= LISTS_CACHE_SIZE


def test_a_schema_the_writer_does_not_know_fails_its_construction():
    with pytest.raises(TemplateDrift, match="not where expected"):
        contact_records._pieces('{"email":"x"}', [("sentinel", "")])
    with pytest.raises(TemplateDrift, match="more often"):
        contact_records._pieces('{"a":"s","b":"s"}', [("s", "")])


def test_writer_refuses_a_line_beyond_the_id_space():
    header = read_header(["email"])
    writer = ContactRecordWriter("acme", header)
    records = writer.records(iter([(EnvelopeIds.MAX_LINE + 1, ["a@example.com"])]))
    with pytest.raises(ValueError, match="does not fit"):
        next(records)


def test_envelope_timestamp_is_pydantics_format():
    for moment in (MOMENT, MOMENT.replace(microsecond=0), datetime(2026, 1, 1, tzinfo=UTC)):
        envelope = wrap(ContactDeleted(contact_id="c"), tenant_id="t", aggregate_id="c", occurred_at=moment)
        assert f'"occurred_at":"{envelope_timestamp(moment)}"' in encode(envelope).decode()


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["acme", "t.0-x_Y"])
def test_contact_ids_are_contact_id_for(tenant):
    ids = ContactIds(tenant)
    for email in ["a@example.com", "A.b+c@example.org", "\u00e9l\u00e8ne@example.com", '"q"@x.io',
                  *(f"user{n}@example.com" for n in range(200))]:
        assert ids.of(email.lower()) == contact_id_for(tenant, email)


def test_envelope_ids_are_version_8_uuids_that_carry_their_line():
    ids, other = EnvelopeIds(), EnvelopeIds()
    assert ids.prefix != other.prefix
    for line in (1, 2, 99, 123_456, EnvelopeIds.MAX_LINE):
        value = ids.for_line(line)
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 8 and parsed.variant == uuid.RFC_4122
        assert value.endswith(f"{line:012d}")
        assert EnvelopeIds.line_of(f'{{"id":"{value}","type":"x"}}'.encode()) == line
    with pytest.raises(ValueError):
        ids.for_line(EnvelopeIds.MAX_LINE + 1)


# --- delivery failures, report, modes ----------------------------------------------------------


def _err(text: str = "Broker: timed out") -> KafkaError:
    return KafkaError(KafkaError._MSG_TIMED_OUT, text)


def test_a_refused_record_rejects_its_row_once_by_the_line_in_its_id():
    text = "email\na@example.com\nb@example.com\n"
    header, rows = numbered_rows(lines(text))
    records = accepted(ContactRecordWriter("acme", header, suppress=True).records(rows))
    failures = DeliveryFailures()
    rejections = failures.rejections
    (_, _, _, upsert_a, suppressed_a), (_, _, _, upsert_b, _) = records
    failures(None, Message(value=upsert_b))              # an acknowledgement: nothing to do
    failures(_err(), Message(value=upsert_a))
    failures(_err("second"), Message(value=suppressed_a))  # same row: rejected once
    failures(_err(), Message(value=None))                 # not one of ours
    failures.fail(2, "refused by the producer")  # the importing thread's word on the same row
    failures.fail(3, "refused by the producer")
    assert failures.lines == {2, 3}
    assert rejections.count == 2
    assert rejections.kept == [RejectedRow(2, "not acknowledged by Kafka: Broker: timed out"),
                               RejectedRow(3, "refused by the producer")]


def test_rejections_are_all_counted_but_only_the_first_ones_kept(monkeypatch):
    from services.cli import contacts_import

    monkeypatch.setattr(contacts_import, "MAX_KEPT_REJECTIONS", 3)
    rejections = Rejections()
    for line in range(2, 12):
        rejections.add(RejectedRow(line, "bad"))
    assert rejections.count == 10 and [r.line for r in rejections.kept] == [2, 3, 4]
    merged, late = Rejections(), Rejections()
    merged.add(RejectedRow(20, "x"))
    for line in (30, 31, 32):
        late.add(RejectedRow(line, "y"))
    merged.merge(late)
    assert merged.count == 4 and [r.line for r in merged.kept] == [20, 30, 31]


def test_report_counts_skipped_rows_in_the_rate():
    report = ImportReport(imported=10, rejected=[], seconds=2.0, rejected_count=2, skipped=8)
    assert report.rows_per_second == 10.0
    assert ImportReport(1, [], 1.0, 0).skipped == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "merge"}, "unknown import mode 'merge'"),
        ({"mode": "blocklist", "list_id": "news"}, "adds no list memberships"),
        ({"tenant_id": "bad tenant"}, "invalid tenant id"),
        ({"list_id": "bad list"}, "invalid list id"),
    ],
)
def test_bad_options_are_refused_before_the_file_is_opened(tmp_path, kwargs, message):
    options = {"tenant_id": "acme", "list_id": None, "mode": "upsert", **kwargs}
    with pytest.raises(CsvImportError, match=message):
        import_contacts(tmp_path / "absent.csv", settings=Settings(), **options)
    assert IMPORT_MODES == ("upsert", "skip-existing", "blocklist")


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
