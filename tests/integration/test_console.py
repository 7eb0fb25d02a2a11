"""The console over HTTP against the real API app and PostgreSQL (real outbox and relay):
sign-in with good and bad keys, the session cookie's flags, CSRF refusals with their reason,
and tenant isolation of pages and actions."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.console.session import CSRF_COOKIE, SESSION_COOKIE
from tests.integration.test_api import World

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
