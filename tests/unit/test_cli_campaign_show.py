"""`campaignctl campaign show`'s output: the hand-picked ids that named no contact."""

from __future__ import annotations

from rich.console import Console

from projections.queries import CampaignProgress
from services.cli.progress import render_campaign


def shown(width: int = 200, **fields) -> str:
    progress = CampaignProgress(
        tenant_id="acme", campaign_id="cmp-1", name="n", status="completed", total=0, queued=0,
        sent=0, failed=0, pending=0, started_at=None, completed_at=None, **fields)
    console = Console(width=width, record=True, soft_wrap=True)
    console.print(render_campaign(progress))
    return console.export_text()


def row(text: str, field: str) -> str:
    line = next(x for x in text.splitlines() if f" {field} " in x)
    return line.split("│")[2].strip()


def test_unknown_contacts_are_counted_then_named_one_per_line_whole_on_a_narrow_terminal():
    long_id = "ct-" + "9" * 100
    text = shown(width=40, unknown_contact_ids=["ghost-1", long_id], unknown_contact_count=2)
    assert row(text, "unknown contacts") == "2"
    assert text.splitlines()[-3:] == [
        "unknown contact ids (no contact of tenant acme):", "  ghost-1", f"  {long_id}"]


def test_unknown_contacts_beyond_the_named_ones_are_counted():
    text = shown(unknown_contact_ids=["ghost-1"], unknown_contact_count=1_501)
    assert row(text, "unknown contacts") == "1,501"
    assert text.splitlines()[-2:] == ["  ghost-1", "  and 1,500 more"]


def test_none_unknown_and_not_hydrated_yet_say_so():
    none = shown(unknown_contact_ids=[], unknown_contact_count=0)
    assert row(none, "unknown contacts") == "0" and "unknown contact ids" not in none
    assert "not hydrated yet" in row(shown(), "unknown contacts")
