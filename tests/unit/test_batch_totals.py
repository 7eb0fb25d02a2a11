"""batch_writer._totals (the counters of an all-new COPY) against a plain per-row count."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from projections.batch_writer import _totals
from projections.read_models import RecipientRow

STATUSES = ["excluded", "queued", "retrying", "sent", "failed", "skipped"]
TERMINAL = {"sent", "failed", "skipped"}
SLOT = {"excluded": 1, "retrying": 2, "sent": 3, "failed": 4, "skipped": 5}


def reference(rows: list[RecipientRow]) -> dict[tuple[Any, ...], list[Any]]:
    latest: dict[str, datetime] = {}
    for r in rows:
        if r.status in TERMINAL:
            latest[r.campaign_id] = max(latest.get(r.campaign_id, r.event_at), r.event_at)
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        second = (datetime.fromtimestamp(int(r.event_at.timestamp()), UTC)
                  if r.status in TERMINAL else None)
        group = groups.setdefault((r.tenant_id, r.campaign_id, second),
                                  [0] * 7 + [latest.get(r.campaign_id)])
        group[0] += r.status != "excluded"
        if r.status in SLOT:
            group[SLOT[r.status]] += 1
        if r.status in ("sent", "failed"):
            group[6] += r.ambiguous
    return groups


def as_groups(columns: list[list[Any]]) -> dict[tuple[Any, ...], list[Any]]:
    tenants, campaigns, seconds, *values = columns
    return {(t, c, s): [v[i] for v in values]
            for i, (t, c, s) in enumerate(zip(tenants, campaigns, seconds, strict=True))}


def rows(rng: random.Random, count: int, *, tenants: int, statuses: list[str]) -> list[RecipientRow]:
    start = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    made = []
    for i in range(count):
        campaign = f"cmp-{rng.randrange(5)}"
        status = rng.choice(statuses)
        made.append(RecipientRow(
            f"tenant-{rng.randrange(tenants)}", campaign, f"c-{i}", f"p{i}@example.com", status,
            1, None, None, None, rng.choice([0, 0, 0, 1, 2]),
            start + timedelta(microseconds=rng.randrange(5_000_000))))
    return sorted(made, key=lambda r: (r.campaign_id, r.contact_id))


def test_a_backlog_of_sent_rows() -> None:
    batch = rows(random.Random(1), 5_000, tenants=1, statuses=["sent"])
    assert as_groups(_totals(batch)) == reference(batch)


def test_every_status_with_ambiguous_outcomes() -> None:
    rng = random.Random(2)
    for _ in range(50):
        batch = rows(rng, rng.randrange(1, 400), tenants=1, statuses=STATUSES)
        assert as_groups(_totals(batch)) == reference(batch)


def test_a_campaign_whose_rows_name_several_tenants() -> None:
    rng = random.Random(3)
    for _ in range(50):
        batch = rows(rng, rng.randrange(1, 400), tenants=3, statuses=STATUSES)
        assert as_groups(_totals(batch)) == reference(batch)


def test_only_non_terminal_rows_have_no_second_and_no_latest() -> None:
    batch = rows(random.Random(4), 100, tenants=1, statuses=["queued", "excluded"])
    groups = as_groups(_totals(batch))
    assert all(second is None and values[-1] is None for (_, _, second), values in groups.items())
    assert groups == reference(batch)
