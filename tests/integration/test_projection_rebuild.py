"""`projections.rebuild` against the real broker and a database of its own: the models rebuilt
from offset zero equal the live ones and swap in atomically; a live model that drifted from the
topics is caught and only replaced when forced.

Each test gets a fresh database (a rebuild replaces whole tables, and the shared test database
holds every other test's rows) and its own topics (the `settings` fixture).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from projections.engagement_projector import ENGAGEMENT_POSITIONS_NAME, engagement_projector_for
from projections.lanes import run_lanes
from projections.migrate import apply_migrations
from projections.projector import lane_projectors, projector_for
from projections.rebuild import READ_MODEL_TABLES, RebuildRefused, rebuild
from schemas.contacts import ContactDeleted, ContactUpserted
from schemas.envelope import encode, wrap
from schemas.events import CampaignPaused
from services.cli.main import app as cli
from services.common.settings import Settings
from services.common.topics import CONTACTS
from tests.integration.test_engagement_projection import (
    delivered_campaign,
    engagement_stream,
    hit,
)
from tests.integration.test_projector import (
    DRAIN_TIMEOUT_SECONDS,
    T0,
    Campaign,
    full_scenario,
    produce,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def own_db(settings: Settings) -> Iterator[Settings]:
    """`settings` pointing at a new database with every migration applied."""
    name = f"rebuild_{uuid.uuid4().hex[:10]}"
    admin_url = make_conninfo(settings.database_url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(settings.database_url, dbname=name)
    apply_migrations(url)
    yield settings.replace(database_url=url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every read-model row (wall-clock columns aside), sorted, per table."""
    out = {}
    with psycopg.connect(url) as conn:
        for table in READ_MODEL_TABLES:
            cur = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            names = [d.name for d in cur.description or []]
            keep = [i for i, n in enumerate(names) if n != "updated_at"]
            out[table] = sorted((tuple(row[i] for i in keep) for row in cur.fetchall()), key=repr)
    return out


def live_projection(settings: Settings) -> None:
    """What the projector service does: its lanes and its engagement lane, caught up."""
    with projector_for(settings) as projector:
        projector.drain(timeout=DRAIN_TIMEOUT_SECONDS)
    engagement = engagement_projector_for(settings)
    try:
        engagement.drain(DRAIN_TIMEOUT_SECONDS)
    finally:
        engagement.close()


def two_campaigns(settings: Settings) -> None:
    a, b = Campaign(), Campaign()
    first, rest, *_ = full_scenario(a, 30)
    produce(settings, first)
    live_projection(settings)  # the live models see the topics in two steps
    produce(settings, rest)
    produce(settings, [b.created(), b.send_requested(), b.hydrated(3),
                       *[b.queued(k) for k in ("x", "y", "z")],
                       b.event(CampaignPaused(reason="checking"), T0 + timedelta(seconds=9)),
                       b.sent("x", 2, T0 + timedelta(minutes=1), ambiguous=1),
                       b.deferred("y", 1, T0 + timedelta(minutes=1)),
                       b.skipped("z", T0 + timedelta(minutes=2)),
                       b.excluded("w", "unsubscribed")])
    live_projection(settings)


def test_rebuilt_models_equal_the_live_ones_and_swap_in(own_db: Settings) -> None:
    two_campaigns(own_db)
    before = snapshot(own_db.database_url)
    assert len(before["campaign_recipients"]) == 34 and len(before["campaigns"]) == 2

    report = rebuild(own_db)

    assert report.positions_match and report.differences == dict.fromkeys(READ_MODEL_TABLES, 0)
    assert report.swapped
    assert snapshot(own_db.database_url) == before
    with psycopg.connect(own_db.database_url) as conn:
        schemas = conn.execute("SELECT count(*) FROM pg_namespace"
                               " WHERE nspname LIKE 'rebuild_%'").fetchone()
        assert schemas == (0,)
        # The live group's positions are the rebuild's: a live projector resumes at the end.
        live = conn.execute("SELECT count(*), sum(next_offset) FROM projector_positions"
                            " WHERE consumer_group = %s", (own_db.group("projector"),)).fetchone()
    assert live is not None and live[0] > 0
    # And it does: nothing left to project, nothing projected twice.
    with projector_for(own_db) as projector:
        assert projector.drain(timeout=DRAIN_TIMEOUT_SECONDS) == 0
    assert snapshot(own_db.database_url) == before


def test_a_drifted_live_model_is_refused_unless_forced(own_db: Settings) -> None:
    two_campaigns(own_db)
    before = snapshot(own_db.database_url)
    with psycopg.connect(own_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE campaigns SET sent = sent + 7")  # drift the read model by hand
        conn.execute("DELETE FROM campaign_recipients WHERE contact_id = 'contact-001'")
    drifted = snapshot(own_db.database_url)

    with pytest.raises(RebuildRefused, match="campaigns 4 rows.*campaign_recipients 1 rows"):
        rebuild(own_db)
    assert snapshot(own_db.database_url) == drifted  # untouched

    report = rebuild(own_db, force=True)
    assert report.swapped and report.differences["campaigns"] == 4
    assert snapshot(own_db.database_url) == before


def test_campaignctl_projections_rebuild(own_db: Settings, monkeypatch) -> None:
    two_campaigns(own_db)
    before = snapshot(own_db.database_url)
    for name, value in (("KAFKA_BOOTSTRAP_SERVERS", own_db.kafka_bootstrap_servers),
                        ("DATABASE_URL", own_db.database_url),
                        ("TOPIC_PREFIX", own_db.topic_prefix)):
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["projections", "rebuild"])
    assert result.exit_code == 0, result.output
    assert "equal to the live ones; swapped in" in result.output
    assert snapshot(own_db.database_url) == before

    with psycopg.connect(own_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE campaign_recipients SET status = 'failed' WHERE status = 'sent'"
                     " AND contact_id = 'contact-002'")
    refused = CliRunner().invoke(cli, ["projections", "rebuild"])
    assert refused.exit_code == 1
    assert "campaign_recipients 2 rows" in refused.output


def test_a_rebuild_while_the_live_projector_runs_keeps_exactly_once(own_db: Settings) -> None:
    a = Campaign()
    first, rest, sent, failed, _ = full_scenario(a, 40)
    produce(own_db, first)
    # The live projector as the service runs it: one Projector per lane.
    live = [*lane_projectors(own_db), engagement_projector_for(own_db)]
    stop = threading.Event()
    runner = threading.Thread(target=run_lanes, args=(live, stop), daemon=True)
    runner.start()
    try:
        later = threading.Timer(0.5, produce, args=(own_db, rest))  # arrives mid-rebuild
        later.start()
        report = rebuild(own_db)
        later.join()
        assert report.swapped and report.equal
        # Both lanes find their positions replaced, reload them and catch up.
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while (p := campaign_progress_row(own_db, a.id)) != ("completed", 40, sent, failed):
            assert runner.is_alive() and time.monotonic() < deadline, p
            time.sleep(0.2)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    # "completed" is the delivery lane's doing: the main lane may have stopped with records of
    # its topics still unapplied. Resume both lanes from their stored positions, as a
    # restarted service would, and let them catch up.
    live_projection(own_db)
    # And what they left equals a replay from scratch: nothing lost, nothing applied twice.
    assert rebuild(own_db).equal


def test_engagement_events_rebuilt_equal_the_live_ones(own_db: Settings) -> None:
    c = delivered_campaign(own_db, 5)
    stream = engagement_stream(c)
    r = [uuid.uuid4() for _ in range(2)]
    # A scanner following both links at once: marked machine by the projector, not the hit.
    burst = [hit(c, "c1", r[0], 9, link=0), hit(c, "c1", r[1], 9, link=1)]
    produce(own_db, stream[:6])
    live_projection(own_db)  # the live engagement lane sees the topics in two steps
    produce(own_db, [*stream[6:], *burst])
    live_projection(own_db)
    before = snapshot(own_db.database_url)
    marked = [row for row in before["engagement_events"] if "all_links_at_once" in row]
    assert len(marked) == 2

    report = rebuild(own_db)

    assert report.equal and report.swapped and report.differences["engagement_events"] == 0
    assert snapshot(own_db.database_url) == before
    with psycopg.connect(own_db.database_url) as conn:
        stored = conn.execute("SELECT count(*) FROM projector_positions WHERE consumer_group = %s",
                              (own_db.group(ENGAGEMENT_POSITIONS_NAME),)).fetchone()
    assert stored is not None and stored[0] > 0
    # The live engagement lane resumes at the swapped positions: nothing counted twice.
    live_projection(own_db)
    assert snapshot(own_db.database_url) == before

    # A live row lost by hand is caught, and only a forced rebuild replaces the table.
    with psycopg.connect(own_db.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM engagement_events WHERE kind = 'complaint'")
    with pytest.raises(RebuildRefused, match="engagement_events 1 rows"):
        rebuild(own_db)
    assert rebuild(own_db, force=True).swapped
    assert snapshot(own_db.database_url) == before


def test_a_deletion_is_rebuilt_erased_as_it_was_live(own_db: Settings) -> None:
    c = delivered_campaign(own_db, 3)

    def contact_event(payload: ContactUpserted | ContactDeleted, minute: int):
        value = encode(wrap(payload, tenant_id=c.tenant, aggregate_id=payload.contact_id,
                            occurred_at=T0 + timedelta(minutes=minute)))
        return CONTACTS, f"{c.tenant}:{payload.contact_id}", value

    produce(own_db, [contact_event(ContactUpserted(contact_id="c0", email="c0@example.com",
                                                   first_name="Zoe"), 1),
                     contact_event(ContactDeleted(contact_id="c0"), 2)])
    live_projection(own_db)
    before = snapshot(own_db.database_url)
    emails = {row[2]: row[3] for row in before["campaign_recipients"]}
    assert emails == {"c0": "", "c1": "c1@example.com", "c2": "c2@example.com"}

    report = rebuild(own_db)  # the erase runs in the rebuild's schema too

    assert report.equal and report.swapped
    assert snapshot(own_db.database_url) == before


def campaign_progress_row(settings: Settings, campaign_id: str) -> tuple | None:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT status, queued, sent, failed FROM campaigns"
                            " WHERE campaign_id = %s", (campaign_id,)).fetchone()
