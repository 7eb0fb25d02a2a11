"""CSV imports by upload (POST /imports) against the real broker and PostgreSQL: the upload is
stored, the API process's runner streams it onto contacts.events, progress and the report are
read back per tenant; a Kafka outage makes the job wait, never lose the upload."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from schemas.contacts import ContactUpserted, contact_id_for
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.api.imports import MAX_UPLOAD_BYTES
from services.common.topics import CONTACTS
from tests.kafka_io import read_topic
from tests.ports import free_ports

pytestmark = pytest.mark.integration

CSV = {"Content-Type": "text/csv"}
# An import of a few rows is done within a second or two; a CI machine may be slower.
DONE_WITHIN_S = 60.0


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def wait_for_state(api: TestClient, key: str, job_id: str, states: set[str],
                   within: float = DONE_WITHIN_S) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        got = api.get(f"/imports/{job_id}", headers=auth(key))
        assert got.status_code == 200, got.text
        job: dict[str, Any] = got.json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
        time.sleep(0.2)


@pytest.fixture
def tenants() -> tuple[tuple[str, str], tuple[str, str]]:
    return ((f"ia-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex),
            (f"ib-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex))


def test_an_upload_is_imported_with_its_report_and_only_its_tenant_sees_it(settings, tenants) -> None:
    (a, key_a), (b, key_b) = tenants
    good = [f"person{i}@example.org,P{i},plan{i % 3}" for i in range(50)]
    body = "\n".join(["email,first_name,plan", *good[:20], "not-an-address,X,pro",
                      *good[20:], "x@example.org,too,many,fields"]) + "\n"
    with TestClient(create_app(settings, ApiKeys([(a, key_a), (b, key_b)]))) as api:
        accepted = api.post("/imports?list_id=news", content=body.encode(), headers=auth(key_a, **CSV))
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert accepted.json()["location"] == f"/imports/{job_id}"
        job = wait_for_state(api, key_a, job_id, {"done", "failed"})
        assert job["state"] == "done", job
        assert (job["imported"], job["rejected_count"], job["rows_total"]) == (50, 2, 52)
        assert [r["line"] for r in job["rejected"]] == [22, 53]
        assert "e-mail" in job["rejected"][0]["reason"] or "address" in job["rejected"][0]["reason"]
        assert job["percent"] == 100.0 and job["attempts"] == 1
        records = read_topic(settings, CONTACTS, until=50)
        assert sorted(r.envelope.aggregate_id for r in records) == sorted(
            contact_id_for(a, f"person{i}@example.org") for i in range(50))
        first = next(r.payload for r in records
                     if r.envelope.aggregate_id == contact_id_for(a, "person7@example.org"))
        assert first == ContactUpserted(contact_id=first.contact_id, email="person7@example.org",
                                        first_name="P7", attributes={"plan": "plan1"}, lists=["news"])
        listed = api.get("/imports", headers=auth(key_a)).json()["jobs"]
        assert [j["job_id"] for j in listed] == [job_id]
        # Tenant B sees neither the job nor it in its list.
        assert api.get(f"/imports/{job_id}", headers=auth(key_b)).status_code == 404
        assert api.get("/imports", headers=auth(key_b)).json() == {"jobs": []}
        assert api.get(f"/imports/{job_id}").status_code == 401
    with psycopg.connect(settings.database_url) as conn:  # a done job keeps no addresses
        assert conn.execute("SELECT count(*) FROM import_uploads WHERE job_id = %s",
                            (job_id,)).fetchone() == (0,)


def test_bad_uploads_are_refused_with_a_reason_and_nothing_is_stored(settings, tenants) -> None:
    (a, key_a), _ = tenants
    with TestClient(create_app(settings, ApiKeys([(a, key_a)]))) as api:
        def post(body: bytes, query: str = "", **headers: str) -> Any:
            return api.post(f"/imports{query}", content=body, headers=auth(key_a, **headers))

        too_big = post(b"email\n" + b"a@example.org\n" * (MAX_UPLOAD_BYTES // 14 + 1), **CSV)
        assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
        no_email = post(b"name,plan\nAda,pro\n", **CSV)
        assert no_email.status_code == 422 and "email" in no_email.json()["detail"]
        empty = post(b"", **CSV)
        assert empty.status_code == 422 and "empty" in empty.json()["detail"]
        json_body = post(b'{"email": 1}', **{"Content-Type": "application/json"})
        assert json_body.status_code == 415 and "text/csv" in json_body.json()["detail"]
        bad_list = post(b"email\na@example.org\n", "?list_id=no%20spaces", **CSV)
        assert bad_list.status_code == 422
        blocklist = post(b"email\na@example.org\n", "?list_id=news&mode=blocklist", **CSV)
        assert blocklist.status_code == 422 and "blocklist" in blocklist.json()["detail"]
        bad_mode = post(b"email\na@example.org\n", "?mode=replace", **CSV)
        assert bad_mode.status_code == 422
        assert api.get("/imports", headers=auth(key_a)).json() == {"jobs": []}
        assert api.get("/imports/not-a-job", headers=auth(key_a)).status_code == 404


def test_with_kafka_away_the_job_waits_and_is_imported_once_kafka_answers(settings, tenants) -> None:
    (a, key_a), _ = tenants
    (dead_port,) = free_ports(1)
    away = settings.replace(kafka_bootstrap_servers=f"127.0.0.1:{dead_port}")
    body = "email\n" + "".join(f"w{i}@example.org\n" for i in range(30))
    with TestClient(create_app(away, ApiKeys([(a, key_a)]), relay=False)) as api:
        accepted = api.post("/imports", content=body.encode(), headers=auth(key_a, **CSV))
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        deadline = time.monotonic() + 60
        while True:  # the first run fails on the metadata check (10 s) and schedules a retry
            job = api.get(f"/imports/{job_id}", headers=auth(key_a)).json()
            if job["last_error"]:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "queued" and job["attempts"] == 1, job
        assert "did not answer" in job["last_error"]
    with psycopg.connect(settings.database_url) as conn:  # the upload is still stored
        assert conn.execute("SELECT length(body) FROM import_uploads WHERE job_id = %s",
                            (job_id,)).fetchone() == (len(body),)
    # Kafka back (an API with a reachable broker): the job is run again when due.
    with TestClient(create_app(settings, ApiKeys([(a, key_a)]), relay=False)) as api:
        job = wait_for_state(api, key_a, job_id, {"done", "failed"})
        assert (job["state"], job["imported"], job["attempts"]) == ("done", 30, 2), job
    assert len(read_topic(settings, CONTACTS, until=30)) == 30
