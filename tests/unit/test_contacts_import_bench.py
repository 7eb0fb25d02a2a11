"""The bench's contacts file: every row imports, and it describes its own audience exactly."""

from __future__ import annotations

from collections import Counter

from bench.contacts_import_bench import PLANS, write_contacts_csv
from schemas.contacts import contact_id_for
from services.cli.contact_csv import ParsedRow, parse_rows


def test_the_contacts_file_is_what_it_says(tmp_path):
    described = write_contacts_csv(tmp_path / "c.csv", 1_000, lists=10, tenant_id="t1")
    with open(described.path, encoding="utf-8", newline="") as f:
        rows = list(parse_rows(f))
    assert all(isinstance(r, ParsedRow) for r in rows) and len(rows) == 1_000
    memberships: Counter[str] = Counter()
    for n, row in enumerate(rows):
        assert isinstance(row, ParsedRow)
        assert row.email == described.email_of(n)
        assert tuple(row.lists) == described.lists_of(n) and len(set(row.lists)) == len(row.lists)
        assert row.attributes == {"plan": described.plan_of(n), "signup": described.signup_of(n)}
        memberships.update(row.lists)
    assert dict(memberships) == described.members_per_list
    assert set(described.members_per_list) == set(described.list_ids) == {f"list-{i}" for i in range(10)}
    # Every 10th contact (all of them in list-0) is in a second list, spread over the others.
    assert sum(described.members_per_list.values()) == 1_100
    assert described.members_per_list["list-0"] == 100
    assert all(111 <= described.members_per_list[f"list-{i}"] <= 112 for i in range(1, 10))
    assert described.plan_counts == dict(Counter(PLANS[n % 3] for n in range(1_000)))
    assert described.size_bytes == described.path.stat().st_size
    assert described.contact_id_of(7) == contact_id_for("t1", "user7@example.com")


def test_contacts_in_is_the_exact_audience_of_lists_and_plans(tmp_path):
    described = write_contacts_csv(tmp_path / "c.csv", 500, lists=4)
    everyone = list(described.contacts_in(described.list_ids))
    assert everyone == list(range(500))
    some = set(described.contacts_in(["list-1", "list-2"], plans={"pro"}))
    assert some == {n for n in range(500)
                    if {"list-1", "list-2"} & set(described.lists_of(n)) and described.plan_of(n) == "pro"}
    assert 0 < len(some) < 500
