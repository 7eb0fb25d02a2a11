"""The console's CSV import pages against the real API app, PostgreSQL and broker: the upload
form (labels, CSRF), a job's progress polled until done with its report, refusals with their
reason, and tenant isolation of the pages."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from tests.integration.test_api import World
from tests.integration.test_console import csrf_of, sign_in

pytestmark = pytest.mark.integration

DONE_WITHIN_S = 60.0
CSV = b"email,first_name\nada@example.org,Ada\nnot-an-address,Bad\nbob@example.org,Bob\n"


@pytest.fixture
def world(platform_settings) -> World:
    return World(platform_settings.database_url)


@pytest.fixture
def app(settings, world):
    return create_app(settings, world.keys, relay=False)


@pytest.fixture
def client_a(app, world) -> Iterator[TestClient]:
    with TestClient(app) as client:
        sign_in(client, world.key_a)
        yield client


def jobs_of(world: World, tenant: str) -> int:
    with psycopg.connect(world.url) as conn:
        row = conn.execute("SELECT count(*) FROM import_jobs WHERE tenant_id = %s",
                           (tenant,)).fetchone()
    assert row is not None
    return int(row[0])


def upload(client: TestClient, body: bytes, **fields: str) -> httpx.Response:
    return client.post("/console/imports", data=fields,
                       files={"file": ("people.csv", body, "text/csv")}, follow_redirects=False)


def test_an_upload_shows_its_progress_then_the_report(client_a, app, world) -> None:
    form = client_a.get("/console/imports")
    assert form.status_code == 200
    for control in ("file", "list_id", "mode"):  # every control has its label
        assert f'<label for="{control}">' in form.text and f'id="{control}"' in form.text
    assert 'enctype="multipart/form-data"' in form.text
    posted = upload(client_a, CSV, csrf=csrf_of(client_a, "/console/imports"), list_id="news",
                    mode="upsert")
    assert posted.status_code == 303, posted.text
    job_url = posted.headers["location"]
    assert re.fullmatch(r"/console/imports/[0-9a-f-]{36}", job_url)
    page = client_a.get(job_url)
    assert page.status_code == 200 and 'id="import-progress"' in page.text
    deadline = time.monotonic() + DONE_WITHIN_S
    while 'data-state="done"' not in (part := client_a.get(job_url + "/progress").text):
        assert 'data-state="failed"' not in part, part
        assert 'hx-trigger="every 1s"' in part  # still polled while queued or running
        assert time.monotonic() < deadline, part
        time.sleep(0.2)
    assert "hx-get" not in part  # a finished job is not polled any more
    assert '<dd class="imported">2</dd>' in part and '<dd class="rejected">1</dd>' in part
    assert re.search(r"<td>3</td><td>[^<]*(e-mail|address)", part), part
    listing = client_a.get("/console/imports").text
    assert job_url in listing and "done" in listing

    # Tenant B sees neither the job nor it in its list.
    with TestClient(app) as client_b:
        sign_in(client_b, world.key_b)
        assert client_b.get(job_url).status_code == 404
        assert client_b.get(job_url + "/progress").status_code == 404
        assert job_url not in client_b.get("/console/imports").text


def test_uploads_without_csrf_or_with_a_bad_file_are_refused_with_the_reason(client_a, world) -> None:
    no_token = upload(client_a, CSV)
    assert no_token.status_code == 403 and "CSRF token missing" in no_token.text
    wrong = upload(client_a, CSV, csrf="forged")
    assert wrong.status_code == 403 and "does not match" in wrong.text
    token = csrf_of(client_a, "/console/imports")
    no_email = upload(client_a, b"name\nAda\n", csrf=token)
    assert no_email.status_code == 422 and "email" in no_email.text and 'role="alert"' in no_email.text
    bad_list = upload(client_a, CSV, csrf=token, list_id="no spaces")
    assert bad_list.status_code == 422 and "invalid list id" in bad_list.text
    empty = upload(client_a, b"", csrf=token)
    assert empty.status_code == 422 and "choose a CSV file" in empty.text
    assert jobs_of(world, world.a) == 0
    # Without a session: to the sign-in page, nothing stored.
    with TestClient(client_a.app) as stranger:
        refused = stranger.post("/console/imports", files={"file": ("p.csv", CSV, "text/csv")},
                                follow_redirects=False)
        assert refused.status_code == 303 and refused.headers["location"] == "/console/signin"
    assert jobs_of(world, world.a) == 0
