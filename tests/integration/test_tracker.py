"""The tracker against the real broker: pixels and redirects answered over HTTP, each hit on
campaign.engagement exactly once with its fields; bad tokens never redirect; with the broker
unreachable the person is still redirected within the bound and the lost hit is counted."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY

from schemas.engagement import AgentClass, EmailOpened, LinkClicked
from services.common.settings import Settings, TrackerSettings
from services.common.topics import ENGAGEMENT
from services.engagement.tokens import TrackingKeys
from services.tracker.app import PIXEL, create_app
from tests.integration.test_api import serving
from tests.kafka_io import read_topic
from tests.ports import free_ports

pytestmark = pytest.mark.integration

SECRET = "tracker-integration-secret-0123456789"
KEYS = TrackingKeys.parse(f"k1:{SECRET}")
CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
# Mail sent an hour ago: no click is "right after delivery".
SENT_AT = int(time.time()) - 3600
# The answer's bound in the outage test (TRACKER_HIT_WAIT_MS), and what the HTTP round trip
# adds; the broker test waits longer, so that a loaded machine cannot make it lose a hit.
WAIT_MS = 1000
SLACK_SECONDS = 0.5
PATIENT_WAIT_MS = 10_000


def tracker_settings(settings: Settings, wait_ms: int, **changes: object) -> TrackerSettings:
    return TrackerSettings.model_validate({
        **settings.model_dump(), "tracker_keys": f"k1:{SECRET}", "tracker_hit_wait_ms": wait_ms,
        **changes})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_pixels_and_redirects_each_hit_once_on_the_topic(settings: Settings) -> None:
    tenant, campaign = "acme", f"cmp-{uuid.uuid4().hex[:8]}"
    url = "https://shop.example/spring?utm_source=mail&x=1"
    opened = KEYS.sign_open(tenant, campaign, "ann", sent_at=SENT_AT)
    clicked = KEYS.sign_click(tenant, campaign, "ann", sent_at=SENT_AT, link_index=1,
                              links_in_mail=2, url=url)
    scanned = KEYS.sign_click(tenant, campaign, "bob", sent_at=SENT_AT, link_index=0,
                              links_in_mail=2, url="https://shop.example/")
    hits_before = sample("campaign_tracker_hits_total", kind="click", machine="true")
    with serving(create_app(tracker_settings(settings, PATIENT_WAIT_MS), KEYS)) as base, \
            httpx.Client(base_url=base, headers={"User-Agent": CHROME}, timeout=10) as http:
        pixel = http.get(f"/o/{opened}.gif")
        assert pixel.status_code == 200 and pixel.content == PIXEL and len(pixel.content) == 43
        assert pixel.headers["content-type"] == "image/gif"
        assert "no-store" in pixel.headers["cache-control"] and pixel.headers["pragma"] == "no-cache"

        redirect = http.get(f"/c/{clicked}", follow_redirects=False)
        assert redirect.status_code == 302 and redirect.headers["location"] == url
        assert "no-store" in redirect.headers["cache-control"]
        assert redirect.headers["referrer-policy"] == "no-referrer"

        head = http.head(f"/c/{scanned}", follow_redirects=False)
        assert head.status_code == 302 and head.headers["location"] == "https://shop.example/"

        key_id, body, mac = clicked.split(".")
        forged = KEYS.sign_click(tenant, campaign, "ann", sent_at=SENT_AT, link_index=1,
                                 links_in_mail=2, url="https://evil.example/").split(".")[1]
        foreign = TrackingKeys.parse("k1:somebody-elses-secret-0123456789").sign_click(
            tenant, campaign, "ann", sent_at=SENT_AT, link_index=0, links_in_mail=1, url=url)
        for bad in (f"{key_id}.{forged}.{mac}", foreign, f"k9.{body}.{mac}", opened):
            refused = http.get(f"/c/{bad}", follow_redirects=False)
            assert refused.status_code == 404 and "location" not in refused.headers
        malformed = http.get("/c/not-a-token", follow_redirects=False)
        assert malformed.status_code == 400 and "location" not in malformed.headers
        assert http.get(f"/o/{clicked}.gif").status_code == 404

    records = read_topic(settings, ENGAGEMENT, until=3)
    assert len(records) == 3, [r.payload for r in records]
    by_type = {type(r.payload).__name__: r for r in records if r.payload.contact_id == "ann"}
    open_record, click_record = by_type["EmailOpened"], by_type["LinkClicked"]
    [scan_record] = [r for r in records if r.payload.contact_id == "bob"]
    for record in records:
        assert record.envelope.tenant_id == tenant and record.envelope.aggregate_id == campaign
        assert record.envelope.id == record.payload.request_id
    assert len({r.envelope.id for r in records}) == 3
    assert open_record.payload == EmailOpened(
        campaign_id=campaign, contact_id="ann", request_id=open_record.envelope.id,
        agent=AgentClass.BROWSER, machine=False)
    assert click_record.payload == LinkClicked(
        campaign_id=campaign, contact_id="ann", request_id=click_record.envelope.id,
        agent=AgentClass.BROWSER, machine=False, link_index=1, links_in_mail=2, url=url)
    scan = scan_record.payload
    assert isinstance(scan, LinkClicked) and scan.machine and scan.machine_reason == "head_request"
    assert sample("campaign_tracker_hits_total", kind="click", machine="true") == hits_before + 1


def test_with_the_broker_unreachable_the_person_is_still_redirected(settings: Settings) -> None:
    [closed_port] = free_ports(1)
    unreachable = tracker_settings(settings, WAIT_MS,
                                   kafka_bootstrap_servers=f"127.0.0.1:{closed_port}")
    url = "https://shop.example/outage"
    token = KEYS.sign_click("acme", "cmp-outage", "cy", sent_at=SENT_AT, link_index=0,
                            links_in_mail=1, url=url)
    opened = KEYS.sign_open("acme", "cmp-outage", "cy", sent_at=SENT_AT)
    lost_before = sample("campaign_tracker_hits_lost_total", kind="click")
    with serving(create_app(unreachable, KEYS)) as base, \
            httpx.Client(base_url=base, headers={"User-Agent": CHROME}, timeout=10) as http:
        started = time.monotonic()
        redirect = http.get(f"/c/{token}", follow_redirects=False)
        took = time.monotonic() - started
        assert redirect.status_code == 302 and redirect.headers["location"] == url
        assert took < WAIT_MS / 1000 + SLACK_SECONDS, f"answered after {took:.2f} s"
        pixel = http.get(f"/o/{opened}.gif")
        assert pixel.status_code == 200 and pixel.content == PIXEL
        # The producer gives the hit up at the same bound; its report may trail the answer.
        deadline = time.monotonic() + 5
        while sample("campaign_tracker_hits_lost_total", kind="click") < lost_before + 1:
            assert time.monotonic() < deadline, "the lost hit was not counted"
            time.sleep(0.1)
    assert sample("campaign_tracker_hits_lost_total", kind="click") == lost_before + 1
    # The same tracker against the real broker never produced these: nothing on the topic.
    assert read_topic(settings, ENGAGEMENT, idle=2.0, timeout=5.0) == []
