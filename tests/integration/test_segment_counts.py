"""Per-segment counts against the real PostgreSQL read models.

Random contacts (random event histories, folded by schemas.contacts for the truth and written
through the projector's own writers) and random criteria: the compiled SQL predicate must
agree with schemas.segments.evaluate on every contact it decides, and every count must equal
the Python count. Then the counts through the API and through an analyst login, with a second
tenant whose contacts and same-named segments must never show up in them.
"""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import typer
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from projections import batch_writer, segment_projection
from projections.read_models import BatchChanges
from projections.segment_counts import (
    CountsUnavailable,
    SegmentDefinition,
    count_segment,
    segment_counts,
)
from projections.segment_sql import compile_criteria
from projections.tenancy import create_analyst_login, drop_analyst_login, tenant_transaction
from schemas.contacts import (
    ContactAttributesChanged,
    ContactDeleted,
    ContactEvent,
    ContactListMembershipAdded,
    ContactListMembershipRemoved,
    ContactState,
    ContactSuppressed,
    ContactUnsubscribed,
    ContactUpserted,
    exclusion_reason,
    fold_contact,
)
from schemas.segments import (
    Criteria,
    SegmentChanged,
    SegmentDefined,
    SegmentDeleted,
    SegmentEvent,
    evaluate,
    parse_criteria,
)
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.cli.segment_counts_cmd import segment_counts_command
from services.common.settings import Settings

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
LISTS = ("news", "vip", "beta")
ATTRS = ("plan", "score", "signup", "city")
# Values chosen to sit on every edge the SQL compiler treats specially: numbers SQL reads and
# numbers only Python reads (underscores, Unicode digits and spaces, huge exponents), dates
# in and out of the decided ISO forms, invalid dates, blanks, case, NUL replaced on storage.
VALUES = (
    "pro", "Pro", "PRO", "pro plan", "free", "", "   ", "\t", "\xa0", "\u3000x",
    "10", " 12.5 ", "-3", "+.5", "1e3", "1E-2", "1e400", "9" * 30, "1_000", "\u0663", "\xa012",
    "0x10", "inf", "nan", "12abc", "abc", "5.",
    "2026-03-01", "2026-03-14T12:00:00", "2026-03-14 12:00:00.5+02:00", "2026-03-15T11:59Z",
    "2026-02-30", "20260301", "2026-W10-1", "2026-03-01t10:00", "2026-03-01T24:00",
    "2025-12-31T23:59:59-05:00", "0001-01-01", " 2026-03-01 ", "\xa02026-03-01",
    "Zürich", "zürich", "a\x00b", "2026-03-01v", "v12", "12v", "\x0b7\x0b", "\x0b2026-03-01",
)
OPS_STRING = ("eq", "ne", "contains", "starts_with", "in", "exists")
OPS_NUMBER = ("gt", "gte", "lt", "lte")
BOUNDS = ("2026-03-01", "2026-03-14T12:00:00+01:00", "3 days ago", "1 week ago", "12 hours ago",
          "2025-12-31")


def _field(rng: random.Random) -> str:
    return rng.choice(("email", "first_name", "last_name", *(f"attr.{a}" for a in ATTRS),
                       "attr.missing"))


def random_criteria(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rng.random()
    if depth < 3 and kind < 0.3:
        op = rng.choice(("all", "any"))
        return {"op": op, "conditions": [random_criteria(rng, depth + 1)
                                         for _ in range(rng.randint(1, 3))]}
    if depth < 3 and kind < 0.4:
        return {"op": "not", "condition": random_criteria(rng, depth + 1)}
    leaf = rng.random()
    if leaf < 0.1:
        return {"op": "in_list", "list_id": rng.choice((*LISTS, "nowhere"))}
    if leaf < 0.45:
        op = rng.choice(OPS_STRING)
        field = _field(rng)
        if op == "exists":
            return {"op": op, "field": field}
        if op == "in":
            return {"op": op, "field": field, "values": rng.sample(VALUES, 3)}
        value = rng.choice([v for v in VALUES if v or op not in ("contains", "starts_with")])
        if op in ("contains", "starts_with") and rng.random() < 0.5 and value:
            value = value[: rng.randint(1, len(value))]
        return {"op": op, "field": field, "value": value}
    if leaf < 0.75:
        return {"op": rng.choice(OPS_NUMBER), "field": f"attr.{rng.choice(('score', 'plan'))}",
                "value": rng.choice((0, 5, 10, -3, 0.5, 1000, 12.5, 1e-2))}
    return {"op": rng.choice(("before", "after")), "field": f"attr.{rng.choice(('signup', 'city'))}",
            "value": rng.choice(BOUNDS)}


def random_history(rng: random.Random, contact_id: str) -> list[ContactEvent]:
    def attrs() -> dict[str, str]:
        return {a: rng.choice(VALUES) for a in ATTRS if rng.random() < 0.7}

    events: list[ContactEvent] = [ContactUpserted(
        contact_id=contact_id, email=f"{contact_id}@example.com",
        first_name=rng.choice(VALUES[:10]), last_name=rng.choice(("Smith", "smith", "", "O'Neil")),
        attributes=attrs(), lists=rng.sample(LISTS, rng.randint(0, 2)))]
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.25:
            unset = [a for a in ATTRS if rng.random() < 0.2]
            events.append(ContactAttributesChanged(
                contact_id=contact_id, set={k: v for k, v in attrs().items() if k not in unset},
                unset=unset))
        elif roll < 0.4:
            events.append(ContactListMembershipAdded(contact_id=contact_id, list_id=rng.choice(LISTS)))
        elif roll < 0.5:
            events.append(ContactListMembershipRemoved(contact_id=contact_id, list_id=rng.choice(LISTS)))
        elif roll < 0.6:
            events.append(ContactUnsubscribed(contact_id=contact_id,
                                              list_id=rng.choice((None, *LISTS))))
        elif roll < 0.7:
            events.append(ContactSuppressed(contact_id=contact_id, reason="hard_bounce"))
        elif roll < 0.8:
            events.append(ContactDeleted(contact_id=contact_id))
        else:
            events.append(ContactUpserted(contact_id=contact_id, email=f"{contact_id}@example.com",
                                          attributes=attrs()))
    return events


def _stored(state: ContactState) -> ContactState:
    """The state as the read models store it (NUL -> U+FFFD), which the counts read."""
    def fix(value: str) -> str:
        return value.replace("\x00", "\ufffd")

    return ContactState(state.id, fix(state.email), fix(state.first_name), fix(state.last_name),
                        {fix(k): fix(v) for k, v in state.attributes.items()}, state.lists,
                        state.unsubscribed_lists, state.globally_unsubscribed,
                        state.suppressed_reason, state.deleted)


def project_contacts(conn: psycopg.Connection[Any], tenant: str,
                     histories: dict[str, list[ContactEvent]], batches: int = 2) -> None:
    """Write the histories as the projector does (batch_writer.apply folds contact_profiles
    too), split over `batches` transactions."""
    for part in range(batches):
        changes = BatchChanges()
        for contact_id, events in histories.items():
            cut = len(events) * part // batches, len(events) * (part + 1) // batches
            if events[cut[0]:cut[1]]:
                changes.contacts[(tenant, contact_id)] = events[cut[0]:cut[1]]
        with conn.transaction():
            batch_writer.apply(conn, changes)


def define(conn: psycopg.Connection[Any], tenant: str, segment_id: str, name: str,
           criteria: dict[str, Any], at: datetime = NOW) -> None:
    event = SegmentDefined(segment_id=segment_id, name=name, criteria=parse_criteria(criteria))
    with conn.transaction(), conn.cursor() as cur:
        segment_projection.write_segments(cur, [(tenant, event, at)])


def purge(conn: psycopg.Connection[Any], tenant: str) -> None:
    with conn.transaction():
        for table in ("contacts", "contact_list_members", "contact_profiles", "segments"):
            conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(sql.Identifier(table)),
                         (tenant,))


def python_counts(states: list[ContactState], criteria: Criteria) -> dict[str, int]:
    counts = dict.fromkeys(("matching", "mailable", "deleted", "suppressed", "unsubscribed"), 0)
    for state in states:
        if not evaluate(criteria, state, NOW):
            continue
        counts["matching"] += 1
        reason = exclusion_reason(state)
        key = "mailable" if reason is None else reason.split(":")[0]
        counts[key] += 1
    return counts


@pytest.fixture(scope="module")
def admin(platform_settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(platform_settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def population(admin: psycopg.Connection[Any]) -> Iterator[tuple[str, list[ContactState]]]:
    """280 random contacts of a fresh tenant, projected; their folded (stored) states."""
    rng = random.Random(20260315)
    tenant = f"seg-{uuid.uuid4().hex[:10]}"
    histories = {f"c{i:04d}": random_history(rng, f"c{i:04d}") for i in range(280)}
    project_contacts(admin, tenant, histories)
    states = [_stored(s) for h in histories.values() if (s := fold_contact(h)) is not None]
    yield tenant, states
    purge(admin, tenant)


def test_stored_profiles_are_the_folded_contacts(
    admin: psycopg.Connection[Any], population: tuple[str, list[ContactState]]
) -> None:
    tenant, states = population
    rows = admin.execute(
        "SELECT contact_id, email, first_name, last_name, attributes, deleted"
        " FROM contact_profiles WHERE tenant_id = %s", (tenant,)).fetchall()
    assert {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows} == {
        s.id: (s.email, s.first_name, s.last_name, dict(s.attributes), s.deleted) for s in states}
    assert any(s.deleted for s in states) and any(s.suppressed_reason for s in states)


def test_sql_predicate_agrees_with_python_on_every_contact_it_decides(
    admin: psycopg.Connection[Any], population: tuple[str, list[ContactState]]
) -> None:
    tenant, states = population
    by_id = {s.id: s for s in states}
    rng = random.Random(7)
    decided = undecided = matched = 0
    for round_ in range(150):
        data = random_criteria(rng)
        criteria = parse_criteria(data)
        predicate = compile_criteria(criteria, NOW)
        rows = admin.execute(sql.SQL(
            "SELECT c.contact_id, {} FROM contacts c JOIN contact_profiles p"
            " USING (tenant_id, contact_id) WHERE c.tenant_id = %s").format(predicate),
            (tenant,)).fetchall()
        assert len(rows) == len(states)
        for contact_id, hit in rows:
            if hit is None:
                undecided += 1
                continue
            decided += 1
            matched += hit
            expected = evaluate(criteria, by_id[contact_id], NOW)
            assert hit == expected, (round_, data, contact_id, by_id[contact_id])
    # SQL decides most rows even on values picked for their edges (ordinary data: all of
    # them); the undecided ones are there, so the fallback is exercised too.
    assert decided > 3 * undecided > 0
    assert 0 < matched < decided


def test_counts_equal_python_evaluation_for_random_segments(
    admin: psycopg.Connection[Any], population: tuple[str, list[ContactState]]
) -> None:
    tenant, states = population
    rng = random.Random(11)
    fallbacks = 0
    for round_ in range(60):
        data = random_criteria(rng)
        criteria = parse_criteria(data)
        segment = SegmentDefinition(f"s{round_}", "random", criteria, NOW, NOW)
        with admin.transaction():
            counts = count_segment(admin, tenant, segment, NOW)
        fallbacks += counts.evaluated_in_python > 0
        got = {"matching": counts.matching, "mailable": counts.mailable,
               "deleted": counts.deleted, "suppressed": counts.suppressed,
               "unsubscribed": counts.unsubscribed}
        assert got == python_counts(states, criteria), (round_, data)
    assert fallbacks > 0  # the Python fallback was exercised, not only the SQL path


def test_relative_dates_follow_the_moment_given(admin: psycopg.Connection[Any]) -> None:
    tenant = f"seg-{uuid.uuid4().hex[:10]}"
    try:
        project_contacts(admin, tenant, {
            "old": [ContactUpserted(contact_id="old", email="old@example.com",
                                    attributes={"signup": "2026-03-01"})],
            "new": [ContactUpserted(contact_id="new", email="new@example.com",
                                    attributes={"signup": "2026-03-14T08:00:00+00:00"})],
        }, batches=1)
        define(admin, tenant, "recent", "signed up last week",
               {"op": "after", "field": "attr.signup", "value": "7 days ago"})
        with admin.transaction():
            assert [c.matching for c in segment_counts(admin, tenant, NOW)] == [1]
            assert [c.matching for c in segment_counts(admin, tenant, NOW + timedelta(days=8))] == [0]
            assert [c.matching for c in segment_counts(admin, tenant, NOW - timedelta(days=12))] == [2]
    finally:
        purge(admin, tenant)


def test_segment_events_leave_the_segment_as_the_aggregate_does(admin: psycopg.Connection[Any]) -> None:
    tenant = f"seg-{uuid.uuid4().hex[:10]}"
    first = parse_criteria({"op": "in_list", "list_id": "news"})
    second = parse_criteria({"op": "eq", "field": "attr.plan", "value": "pro\x00"})
    t0 = NOW
    try:
        with admin.transaction(), admin.cursor() as cur:
            segment_projection.write_segments(cur, [
                (tenant, SegmentDefined(segment_id="a", name="A", criteria=first), t0),
                (tenant, SegmentDefined(segment_id="gone", name="G", criteria=first), t0),
                (tenant, SegmentDeleted(segment_id="gone"), t0 + timedelta(seconds=1)),
            ])
        with admin.transaction(), admin.cursor() as cur:
            segment_projection.write_segments(cur, [
                (tenant, SegmentChanged(segment_id="a", name="A2", criteria=second),
                 t0 + timedelta(seconds=2)),
            ])
        with admin.transaction():
            live = segment_counts(admin, tenant, NOW)
        assert [(c.segment_id, c.name, c.matching) for c in live] == [("a", "A2", 0)]
        row = admin.execute("SELECT defined_at, changed_at, deleted FROM segments"
                            " WHERE tenant_id = %s AND segment_id = 'gone'", (tenant,)).fetchone()
        assert row == (t0, t0 + timedelta(seconds=1), True)
    finally:
        purge(admin, tenant)


def test_contacts_without_a_profile_refuse_the_count(admin: psycopg.Connection[Any]) -> None:
    tenant = f"seg-{uuid.uuid4().hex[:10]}"
    try:
        admin.execute("INSERT INTO contacts (tenant_id, contact_id) VALUES (%s, 'legacy')", (tenant,))
        define(admin, tenant, "all", "everyone", {"op": "ne", "field": "email", "value": "x"})
        with pytest.raises(CountsUnavailable, match="rebuild"), admin.transaction():
            segment_counts(admin, tenant, NOW)
    finally:
        purge(admin, tenant)


# --- tenant isolation: the API key and the analyst login ---------------------------------------


@pytest.fixture
def two_tenants(admin: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    """Tenant A: 3 pro contacts (one unsubscribed), segment 'pro'. Tenant B: 5 pro contacts
    and a segment with the same id and criteria, plus one of its own."""
    a, b = f"sega-{uuid.uuid4().hex[:8]}", f"segb-{uuid.uuid4().hex[:8]}"

    def pro(i: int) -> ContactUpserted:
        return ContactUpserted(contact_id=f"p{i}", email=f"p{i}@example.com",
                               attributes={"plan": "pro"}, lists=["news"])

    histories_a: dict[str, list[ContactEvent]] = {f"p{i}": [pro(i)] for i in range(3)}
    histories_a["p0"].append(ContactUnsubscribed(contact_id="p0"))
    project_contacts(admin, a, histories_a, batches=1)
    project_contacts(admin, b, {f"p{i}": [pro(i)] for i in range(5)}, batches=1)
    criteria = {"op": "all", "conditions": [{"op": "eq", "field": "attr.plan", "value": "pro"},
                                            {"op": "in_list", "list_id": "news"}]}
    define(admin, a, "pro", "Pro customers", criteria)
    define(admin, b, "pro", "B's pro", criteria)
    define(admin, b, "b-only", "B only", {"op": "exists", "field": "email"})
    yield a, b
    purge(admin, a)
    purge(admin, b)


def test_api_counts_only_the_callers_tenant(
    platform_settings: Settings, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    key_a, key_b = secrets.token_hex(8), secrets.token_hex(8)
    app = create_app(platform_settings, ApiKeys([(a, key_a), (b, key_b)]), relay=False)
    with TestClient(app) as client:
        as_a = {"Authorization": f"Bearer {key_a}"}
        listed = client.get("/segments", headers=as_a)
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert [(s["segment_id"], s["name"], s["matching"], s["mailable"], s["unsubscribed"])
                for s in body["segments"]] == [("pro", "Pro customers", 3, 2, 1)]
        assert body["segments"][0]["criteria"]["op"] == "all"
        one = client.get("/segments/pro", headers=as_a).json()
        assert (one["matching"], one["mailable"]) == (3, 2)
        # B's own segment id answers 404 to A exactly like an unknown one.
        assert client.get("/segments/b-only", headers=as_a).status_code == 404
        assert client.get("/segments/nope", headers=as_a).status_code == 404
        as_b = client.get("/segments/pro", headers={"Authorization": f"Bearer {key_b}"}).json()
        assert (as_b["name"], as_b["matching"], as_b["mailable"]) == ("B's pro", 5, 5)
        assert client.get("/segments").status_code == 401


def test_analyst_login_counts_only_its_tenant(
    admin: psycopg.Connection[Any], platform_settings: Settings, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    name, password = f"test_seg_{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12)
    create_analyst_login(admin, name, password, tenants=[a])
    try:
        url = make_conninfo(platform_settings.database_url, user=name, password=password)
        with psycopg.connect(url, autocommit=True) as analyst:
            with tenant_transaction(analyst, a):
                counts = segment_counts(analyst, a, NOW)
                assert [(c.segment_id, c.matching, c.mailable) for c in counts] == [("pro", 3, 2)]
                # Asking for B's rows inside A's transaction finds nothing to count.
                assert segment_counts(analyst, b, NOW) == []
                seen = analyst.execute(
                    "SELECT DISTINCT tenant_id FROM analyst_segments UNION"
                    " SELECT DISTINCT tenant_id FROM contact_profiles").fetchall()
                assert seen == [(a,)]
            with tenant_transaction(analyst, b):  # not granted: nothing at all
                assert segment_counts(analyst, b, NOW) == []
                assert analyst.execute("SELECT count(*) FROM contact_profiles").fetchone() == (0,)
    finally:
        drop_analyst_login(admin, name)


def test_segment_rows_do_not_depend_on_batch_boundaries(admin: psycopg.Connection[Any]) -> None:
    """A rebuild batches the log differently from the live projector: same rows either way."""
    criteria = parse_criteria({"op": "exists", "field": "email"})
    log: list[SegmentEvent] = [
        SegmentDefined(segment_id="s", name="one", criteria=criteria),
        SegmentChanged(segment_id="s", name="two", criteria=criteria),
        SegmentDeleted(segment_id="s"),
        SegmentDefined(segment_id="s", name="three", criteria=criteria),
        SegmentDefined(segment_id="t", name="t", criteria=criteria),
        SegmentDeleted(segment_id="t"),
    ]
    timed = [(event, NOW + timedelta(seconds=i)) for i, event in enumerate(log)]
    results = []
    for cuts in ([6], [1, 1, 1, 1, 1, 1], [2, 4], [3, 3]):
        tenant = f"seg-{uuid.uuid4().hex[:10]}"
        position = 0
        for size in cuts:
            with admin.transaction(), admin.cursor() as cur:
                segment_projection.write_segments(
                    cur, [(tenant, e, at) for e, at in timed[position:position + size]])
            position += size
        results.append(admin.execute(
            "SELECT segment_id, name, criteria::text, deleted, defined_at, changed_at"
            " FROM segments WHERE tenant_id = %s ORDER BY segment_id", (tenant,)).fetchall())
        purge(admin, tenant)
    assert all(r == results[0] for r in results[1:]), results
    assert [(r[0], r[1], r[3], r[4]) for r in results[0]] == [
        ("s", "three", False, NOW + timedelta(seconds=3)),
        ("t", "t", True, NOW + timedelta(seconds=4))]


def test_cli_prints_the_counts_of_the_tenant(
    platform_settings: Settings, two_tenants: tuple[str, str]
) -> None:
    a, _ = two_tenants
    app = typer.Typer()
    app.command()(segment_counts_command)
    env = {"DATABASE_URL": platform_settings.database_url, "COLUMNS": "200"}
    shown = CliRunner().invoke(app, ["--tenant", a], env=env)
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "Pro customers" in line)
    assert [cell.strip() for cell in row.split("│")][3:5] == ["3", "2"]
    assert "b-only" not in shown.output
    missing = CliRunner().invoke(app, ["--tenant", a, "b-only"], env=env)
    assert missing.exit_code == 3
    assert CliRunner().invoke(app, ["--tenant", "bad tenant"], env=env).exit_code == 2
