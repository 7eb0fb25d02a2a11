"""The console over HTTP against the real API app and PostgreSQL (real outbox and relay):
sign-in with good and bad keys, the session cookie's flags, CSRF refusals with their reason,
tenant isolation of pages and actions; the audience picker's estimate against the hydrator's
own resolution over random contacts; draft edits, the throughput chart, the engagement panel
and the lists pages."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from projections.tenancy import tenant_transaction
from schemas.contacts import ContactState, fold_contact
from schemas.envelope import decode
from schemas.events import Audience, AudienceSegment
from schemas.segments import parse_criteria
from services.api.app import create_app
from services.console import audience
from services.console.audience import MAILABLE, REASONS, AudienceChoice
from services.console.session import CSRF_COOKIE, SESSION_COOKIE
from services.hydrator.audience import resolve_audience, to_stored
from tests.integration.test_api import World
from tests.integration.test_segment_counts import (
    LISTS,
    _stored,
    define,
    project_contacts,
    purge,
    random_criteria,
    random_history,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def world(platform_settings) -> World:
    return World(platform_settings.database_url)


@pytest.fixture
def app_client(settings, world) -> Iterator[TestClient]:
    with TestClient(create_app(settings, world.keys)) as c:
        yield c


def csrf_of(client: TestClient, path: str = "/console/signin") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def sign_in(client: TestClient, key: str) -> None:
    response = client.post("/console/signin", data={"csrf": csrf_of(client), "api_key": key},
                           follow_redirects=False)
    assert response.status_code == 303, response.text


def outbox_rows(world: World, aggregate_id: str) -> int:
    with psycopg.connect(world.url) as conn:
        row = conn.execute("SELECT count(*) FROM command_outbox WHERE aggregate_id = %s",
                           (aggregate_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_sign_in_with_a_good_key_sets_a_strict_httponly_signed_session(app_client, world):
    assert app_client.get("/console/campaigns", follow_redirects=False).headers["location"] == "/console/signin"
    token = csrf_of(app_client)
    response = app_client.post("/console/signin", data={"csrf": token, "api_key": world.key_a},
                               follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/campaigns"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
    assert world.key_a not in cookie, "the API key must not travel in the cookie"
    page = app_client.get("/console/campaigns")
    assert page.status_code == 200 and world.a in page.text

    # An altered session is no session.
    value = app_client.cookies[SESSION_COOKIE]
    app_client.cookies.set(SESSION_COOKIE, value[:-2] + ("AA" if not value.endswith("AA") else "BB"),
                           path="/console")
    assert app_client.get("/console/campaigns", follow_redirects=False).status_code == 303


def test_a_bad_key_is_refused_and_gives_no_session(app_client):
    response = app_client.post("/console/signin", data={"csrf": csrf_of(app_client), "api_key": "nope"},
                               follow_redirects=False)
    assert response.status_code == 401 and "not known" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    assert app_client.get("/console/campaigns", follow_redirects=False).status_code == 303


def test_a_post_without_or_with_a_wrong_csrf_token_is_403_with_the_reason(app_client, world):
    campaign = world.campaign(world.a, status="sending")
    sign_in(app_client, world.key_a)
    missing = app_client.post(f"/console/campaigns/{campaign}/pause", data={"reason": "x"})
    assert missing.status_code == 403 and missing.json()["detail"] == "CSRF token missing from the form"
    wrong = app_client.post(f"/console/campaigns/{campaign}/pause", data={"csrf": "forged", "reason": "x"})
    assert wrong.status_code == 403 and "does not match" in wrong.json()["detail"]
    # A token is only good with the nonce cookie it was made for.
    token = csrf_of(app_client, "/console/campaigns")
    app_client.cookies.delete(CSRF_COOKIE, path="/console")
    no_cookie = app_client.post(f"/console/campaigns/{campaign}/pause", data={"csrf": token})
    assert no_cookie.status_code == 403 and "cookie missing" in no_cookie.json()["detail"]
    signin = TestClient(app_client.app).post("/console/signin", data={"api_key": world.key_a})
    assert signin.status_code == 403
    assert outbox_rows(world, campaign) == 0, "a refused POST stored a command"


def test_a_session_of_tenant_a_never_sees_or_changes_tenant_bs_campaign(app_client, world):
    mine = world.campaign(world.a, name="Mine", status="sending")
    theirs = world.campaign(world.b, name="Theirs", status="sending")
    sign_in(app_client, world.key_a)
    listing = app_client.get("/console/campaigns").text
    assert "Mine" in listing and "Theirs" not in listing and theirs not in listing
    assert app_client.get(f"/console/campaigns/{theirs}").status_code == 404
    assert app_client.get(f"/console/campaigns/{theirs}/progress").status_code == 404
    token = csrf_of(app_client, f"/console/campaigns/{mine}")
    for action in ("pause", "cancel", "send", "test"):
        refused = app_client.post(f"/console/campaigns/{theirs}/{action}",
                                  data={"csrf": token, "addresses": "x@example.com"}, follow_redirects=False)
        assert refused.status_code == 404, action
    assert outbox_rows(world, theirs) == 0
    # The same action on A's own campaign goes through the gateway into the outbox.
    paused = app_client.post(f"/console/campaigns/{mine}/pause", data={"csrf": token, "reason": "hold"},
                             follow_redirects=False)
    assert paused.status_code == 303 and "PauseCampaign+accepted" in paused.headers["location"]
    assert outbox_rows(world, mine) == 1


def test_invalid_campaign_input_is_shown_with_each_fault_and_nothing_is_stored(app_client, world):
    sign_in(app_client, world.key_a)
    token = csrf_of(app_client, "/console/campaigns/new")
    response = app_client.post("/console/campaigns/new", data={
        "csrf": token, "action": "create", "name": "", "subject": "Hi", "from_address": "not-an-address"})
    assert response.status_code == 422
    assert "name" in response.text and "from_address" in response.text


def test_preview_renders_for_a_sample_contact_in_a_sandboxed_iframe(app_client, world):
    sign_in(app_client, world.key_a)
    token = csrf_of(app_client, "/console/campaigns/new")
    response = app_client.post("/console/campaigns/new", data={
        "csrf": token, "action": "preview", "name": "P", "subject": "Hello {{ first_name }}",
        "from_address": "news@example.com", "body_text": "Dear {{ last_name }}",
        "body_html": "<p>Hi {{ first_name }}</p><script>alert(1)</script>"})
    assert response.status_code == 200
    assert "Hello Ada" in response.text and "Dear Lovelace" in response.text
    frame = re.search(r'<iframe id="preview-html" title="HTML preview" sandbox srcdoc="([^"]*)"', response.text)
    assert frame, "no sandboxed iframe"
    assert "&lt;p&gt;Hi Ada&lt;/p&gt;" in frame.group(1) and "<script>" not in frame.group(1)


# -- the audience picker -------------------------------------------------------------------

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def population(world) -> Iterator[list[ContactState]]:
    """240 random contacts of tenant A (random histories: unsubscribes, suppressions,
    deletions, list changes), projected by the projector's own writer; their stored states."""
    rng = random.Random(20261207)
    histories = {f"c{i:04d}": random_history(rng, f"c{i:04d}") for i in range(240)}
    with psycopg.connect(world.url, autocommit=True) as conn:
        project_contacts(conn, world.a, histories)
        yield [_stored(s) for h in histories.values() if (s := fold_contact(h)) is not None]
        purge(conn, world.a)


def hydrator_outcomes(states: list[ContactState], tenant: str, audience_: Audience) -> dict[str, int]:
    """What the hydrator's resolve_audience decides for every contact, tallied."""
    stored = [(f"{tenant}:{s.id}", to_stored(s, partition=0, first_offset=0)) for s in states]
    tally = dict.fromkeys((MAILABLE, *REASONS), 0)
    for _, _, reason in resolve_audience(stored, tenant_id=tenant, partition=0, audience=audience_,
                                         snapshot_offset=1, now=NOW):
        tally[MAILABLE if reason is None else reason.split(":")[0]] += 1
    return tally


def test_the_estimate_equals_the_hydrators_resolution_for_random_choices(world, population):
    rng = random.Random(7)
    criteria = {f"s{i}": random_criteria(rng) for i in range(6)}
    with psycopg.connect(world.url, autocommit=True) as conn:
        for segment_id, c in criteria.items():
            define(conn, world.a, segment_id, f"Segment {segment_id}", c)
    ids = [s.id for s in population]
    checked = python_decided = 0
    for _ in range(40):
        choice = AudienceChoice(
            contact_ids=tuple(rng.sample(ids, rng.randint(0, 5))) + (("nobody",) if rng.random() < 0.3 else ()),
            list_ids=tuple(rng.sample((*LISTS, "nowhere"), rng.randint(0, 2))),
            segment_ids=tuple(rng.sample(sorted(criteria), rng.randint(0, 2))),
            exclude_list_ids=tuple(rng.sample(LISTS, rng.randint(0, 1))),
            exclude_segment_ids=tuple(rng.sample(sorted(criteria), rng.randint(0, 1))))
        segment = lambda sid: AudienceSegment(segment_id=sid, criteria=parse_criteria(criteria[sid]))  # noqa: E731
        expected = hydrator_outcomes(population, world.a, Audience(
            contact_ids=list(choice.contact_ids), list_ids=list(choice.list_ids),
            segments=[segment(s) for s in choice.segment_ids],
            exclude_list_ids=list(choice.exclude_list_ids),
            exclude_segments=[segment(s) for s in choice.exclude_segment_ids]))
        with psycopg.connect(world.url, autocommit=True) as conn, tenant_transaction(conn, world.a):
            found = audience.estimate(conn, world.a, choice, NOW)
        assert found.outcomes == expected, choice
        assert found.unknown_contact_ids == ("nobody" in choice.contact_ids)
        checked += found.reached
        python_decided += found.evaluated_in_python
    assert checked > 500, "the random choices reached too few contacts to mean anything"
    assert python_decided > 0, "no choice exercised the Python fallback"


def estimate_of(client: TestClient, query: str) -> str:
    response = client.get(f"/console/audience/estimate?{query}")
    assert response.status_code == 200, response.text
    found = re.search(r'data-mailable="(\d*)"', response.text)
    assert found, response.text
    return found.group(1)


def test_the_picker_offers_the_tenants_lists_and_segments_and_counts_live(app_client, world, population):
    with psycopg.connect(world.url, autocommit=True) as conn:
        define(conn, world.a, "pro", "Pro plan", {"op": "eq", "field": "attr.plan", "value": "pro"})
        define(conn, world.b, "theirs", "Their segment", {"op": "exists", "field": "email"})
    def truth(**chosen) -> str:
        a = Audience(**chosen)
        return str(hydrator_outcomes(population, world.a, a)[MAILABLE])

    sign_in(app_client, world.key_a)
    picker = app_client.get("/console/campaigns/new").text
    for list_id in LISTS:
        assert f'name="list_ids" value="{list_id}"' in picker
        assert f'name="exclude_list_ids" value="{list_id}"' in picker
    assert 'name="segment_ids" value="pro"' in picker and "Their segment" not in picker
    assert 'hx-get="/console/audience/estimate"' in picker and 'id="estimate"' in picker
    # A page opened with a choice shows its estimate before any change.
    carried = app_client.get("/console/campaigns/new?list_ids=news&exclude_list_ids=beta").text
    shown = re.search(r'data-mailable="(\d+)"', carried)
    assert shown and shown.group(1) == truth(list_ids=["news"], exclude_list_ids=["beta"])

    pro = AudienceSegment(segment_id="pro", criteria=parse_criteria(
        {"op": "eq", "field": "attr.plan", "value": "pro"}))
    assert estimate_of(app_client, "list_ids=news") == truth(list_ids=["news"])
    assert estimate_of(app_client, "list_ids=news&list_ids=vip&exclude_list_ids=beta") == truth(
        list_ids=["news", "vip"], exclude_list_ids=["beta"])
    assert estimate_of(app_client, "segment_ids=pro&exclude_list_ids=vip") == truth(
        segments=[pro], exclude_list_ids=["vip"])
    assert estimate_of(app_client, "list_ids=news&exclude_segment_ids=pro") == truth(
        list_ids=["news"], exclude_segments=[pro])
    assert estimate_of(app_client, "") == "0"
    # Another tenant's segment is unknown here: the send would be rejected, and it says so.
    theirs = app_client.get("/console/audience/estimate?segment_ids=theirs").text
    assert "Unknown segment(s): theirs" in theirs
    bad = app_client.get("/console/audience/estimate?list_ids=" + "x" * 300).text
    assert "not a valid id" in bad
    # Tenant B's session sees none of A's lists.
    other = TestClient(app_client.app)
    sign_in(other, world.key_b)
    assert 'value="news"' not in other.get("/console/campaigns/new").text
    assert estimate_of(other, "list_ids=news") == "0"


def outbox_payloads(world: World, aggregate_id: str) -> list[tuple[str, dict]]:
    with psycopg.connect(world.url) as conn:
        rows = conn.execute("SELECT envelope FROM command_outbox WHERE aggregate_id = %s ORDER BY seq",
                            (aggregate_id,)).fetchall()
    messages = [decode(bytes(r[0])) for r in rows]
    return [(m.envelope.type, m.payload.model_dump(mode="json")) for m in messages]


def test_send_and_schedule_carry_the_picked_audience_into_the_command(app_client, world):
    campaign = world.campaign(world.a, status="draft")
    sign_in(app_client, world.key_a)
    query = "list_ids=news&list_ids=vip&segment_ids=pro&exclude_list_ids=beta&exclude_segment_ids=churned"
    page = app_client.get(f"/console/campaigns/{campaign}?{query}&contact_ids=c1,c2").text
    token = csrf_of(app_client, f"/console/campaigns/{campaign}")
    assert 'id="send-now"' in page and f'formaction="/console/campaigns/{campaign}/schedule"' in page
    assert 'value="c1, c2"' in page, "hand-picked ids not carried"
    form = [("csrf", token), ("list_ids", "news"), ("list_ids", "vip"), ("segment_ids", "pro"),
            ("exclude_list_ids", "beta"), ("exclude_segment_ids", "churned"), ("contact_ids", "c1, c2"),
            ("send_at", "2030-01-02T03:04")]
    sent = app_client.post(f"/console/campaigns/{campaign}/send", content=_urlencoded(form),
                           headers=FORM, follow_redirects=False)
    assert sent.status_code == 303 and "list_ids=news&list_ids=vip" in sent.headers["location"]
    scheduled = app_client.post(f"/console/campaigns/{campaign}/schedule", content=_urlencoded(form),
                                headers=FORM, follow_redirects=False)
    assert scheduled.status_code == 303
    audience_ = {"contact_ids": ["c1", "c2"], "list_ids": ["news", "vip"], "segment_ids": ["pro"],
                 "exclude_list_ids": ["beta"], "exclude_segment_ids": ["churned"]}
    (send_type, send), (schedule_type, schedule) = outbox_payloads(world, campaign)
    assert send_type == "SendCampaign" and send == audience_
    assert schedule_type == "ScheduleCampaign" and schedule["send"] == audience_
    assert schedule["send_at"].startswith("2030-01-02T03:04:00")
    # A malformed id is refused with its name, and nothing is stored.
    bad = app_client.post(f"/console/campaigns/{campaign}/send",
                          data={"csrf": token, "list_ids": "bad id!"})
    assert bad.status_code == 422 and "not a valid id" in bad.text
    assert outbox_rows(world, campaign) == 2


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _urlencoded(pairs: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode
    return urlencode(pairs)


# -- draft edits ---------------------------------------------------------------------------

def test_a_draft_edit_sends_only_what_changed_and_never_for_another_tenant(app_client, world):
    mine = world.campaign(world.a, status="draft", subject="Old subject")
    theirs = world.campaign(world.b, status="draft")
    sign_in(app_client, world.key_a)
    page = app_client.get(f"/console/campaigns/{mine}/edit")
    assert page.status_code == 200 and 'value="Old subject"' in page.text
    token = csrf_of(app_client, f"/console/campaigns/{mine}/edit")
    preview = app_client.post(f"/console/campaigns/{mine}/edit", data={
        "csrf": token, "action": "preview", "subject": "New {{ first_name }}", "body_html": "<b>x</b>"})
    assert preview.status_code == 200 and "New Ada" in preview.text and "sandbox srcdoc" in preview.text
    assert outbox_rows(world, mine) == 0, "a preview stored a command"
    saved = app_client.post(f"/console/campaigns/{mine}/edit", data={
        "csrf": token, "action": "update", "name": "", "subject": "New {{ first_name }}",
        "remove_body_text": "on", "track_opens": "on", "track_clicks": ""}, follow_redirects=False)
    assert saved.status_code == 303 and "UpdateCampaign+accepted" in saved.headers["location"]
    [(kind, payload)] = outbox_payloads(world, mine)
    assert kind == "UpdateCampaign"
    assert {k: v for k, v in payload.items() if v is not None} == {
        "subject": "New {{ first_name }}", "body_text": "", "track_opens": True}
    nothing = app_client.post(f"/console/campaigns/{mine}/edit", data={"csrf": token, "action": "update"})
    assert nothing.status_code == 422 and "nothing to change" in nothing.text
    assert app_client.get(f"/console/campaigns/{theirs}/edit").status_code == 404
    refused = app_client.post(f"/console/campaigns/{theirs}/edit",
                              data={"csrf": token, "action": "update", "subject": "x"})
    assert refused.status_code == 404 and outbox_rows(world, theirs) == 0


# -- the campaign page: chart and engagement ------------------------------------------------

def test_the_campaign_page_draws_throughput_and_shows_engagement(app_client, world):
    campaign = world.campaign(world.a, status="sending", sent=40)
    for ago, settled in ((30, 5), (20, 7), (10, 3)):
        world.throughput(world.a, campaign, settled, ago)
    # 10 people and 4 machines open (one person twice), 3 people click, 2 hard bounces, 1 complaint.
    hits = ([("open", f"p{i}", False) for i in range(10)] + [("open", "p0", False)]
            + [("open", f"m{i}", True) for i in range(4)] + [("click", f"p{i}", False) for i in range(3)]
            + [("hard_bounce", "b0", False), ("hard_bounce", "b1", False), ("complaint", "p9", False)])
    for kind, contact, machine in hits:
        world.sql("INSERT INTO engagement_events (tenant_id, event_id, campaign_id, contact_id, kind,"
                  " occurred_at, machine) VALUES (%s, %s, %s, %s, %s, now(), %s)",
                  (world.a, uuid.uuid4().hex, campaign, contact, kind, machine))
    sign_in(app_client, world.key_a)
    page = app_client.get(f"/console/campaigns/{campaign}").text
    svg = re.search(r'<svg id="throughput".*?</svg>', page, re.S)
    assert svg and 'role="img"' in svg.group(0) and 'data-total="15"' in svg.group(0)
    assert '<title id="throughput-title">' in svg.group(0) and "15 recipients settled" in svg.group(0)
    assert sum(int(n) for n in re.findall(r'data-settled="(\d+)"', svg.group(0))) == 15
    opens = re.search(r'<tr class="engagement-opens">(.*?)</tr>', page, re.S)
    assert opens and "<td>10</td><td>4</td>" in opens.group(1) and "11 / 4" in opens.group(1)
    assert "25.0 %" in opens.group(1)
    assert re.search(r'engagement-complaints.*?<td colspan="3">1</td>', page, re.S)
    # A campaign with nothing settled says so instead of drawing an empty chart.
    quiet = world.campaign(world.a, status="draft")
    assert "Nothing settled yet." in app_client.get(f"/console/campaigns/{quiet}").text


# -- lists ---------------------------------------------------------------------------------

def test_lists_show_member_counts_and_page_through_members_per_tenant(app_client, world):
    with psycopg.connect(world.url, autocommit=True) as conn:
        for i in range(120):
            conn.execute("INSERT INTO contact_list_members (tenant_id, list_id, contact_id) VALUES (%s, 'big', %s)",
                         (world.a, f"m{i:04d}"))
            conn.execute("INSERT INTO contacts (tenant_id, contact_id, globally_unsubscribed) VALUES (%s, %s, %s)",
                         (world.a, f"m{i:04d}", i % 10 == 0))
        conn.execute("INSERT INTO contact_list_members (tenant_id, list_id, contact_id) VALUES (%s, 'secret', 'x')",
                     (world.b,))
    sign_in(app_client, world.key_a)
    listing = app_client.get("/console/lists").text
    row = re.search(r'<tr class="list" data-list-id="big">(.*?)</tr>', listing, re.S)
    assert row and "<td>120</td><td>108</td><td>12</td>" in row.group(1)
    assert "secret" not in listing
    seen, url = [], "/console/lists/big"
    while url:
        page = app_client.get(url).text
        seen += re.findall(r'<tr class="member"><td><a href="/console/contacts/([^"]+)"', page)
        nxt = re.search(r'<a href="(/console/lists/big\?after=[^"]+)">Next page</a>', page)
        url = nxt.group(1) if nxt else ""
    assert seen == [f"m{i:04d}" for i in range(120)], "paging lost or repeated members"
    assert app_client.get("/console/lists/secret").status_code == 404
    assert app_client.get("/console/lists/nosuch").status_code == 404
