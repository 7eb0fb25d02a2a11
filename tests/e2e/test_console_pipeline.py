"""The console end to end: a campaign created and sent from the console's forms goes through
the gateway and the real pipeline (command handler, hydrator, sender, projector, completion as
processes) to the SMTP sink, and the campaign page then shows 100 % and completed. Once over
HTTP, once in headless Chromium (Debian's chromium + chromedriver, installed by .ci/run), which
also saves screenshots at 1280 and 390 px under the test's tmp dir."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from schemas.base import normalise_email
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.topics import CONTACTS
from services.smtp_sink import SinkConfig, SmtpSink, header
from tests.e2e.test_dashboard import browser  # noqa: F401 - the headless Chromium fixture
from tests.integration.test_api import serving
from tests.kafka_io import publish
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.e2e
SERVICES = ("command_handler", "hydrator", "sender", "projector", "completion")
RECIPIENTS = 5
DONE_TIMEOUT_S = 180


@dataclass
class Console:
    base: str
    tenant: str
    key: str
    list_id: str
    sink: SmtpSink
    procs: list[ServiceProcess]


@contextmanager
def console_on_pipeline(settings) -> Iterator[Console]:
    tenant, key, list_id = f"t-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, "vip"
    records = []
    for i in range(RECIPIENTS):
        email = normalise_email(f"reader{i}@example.org")
        cid = contact_id_for(tenant, email)
        records.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, first_name=f"R{i}", lists=[list_id]),
            tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, records)
    with SmtpSink(SinkConfig(port=0)) as sink:
        run = settings.replace(smtp_port=sink.port)
        procs = [ServiceProcess(name, run).start() for name in SERVICES]
        try:
            with serving(create_app(run, ApiKeys([(tenant, key)]))) as base:
                yield Console(base, tenant, key, list_id, sink, procs)
        finally:
            for p in procs:
                p.stop()


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1)


def wait_completed(console: Console, fetch) -> str:
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while time.monotonic() < deadline:
        page = fetch()
        if 'data-status="completed"' in page:
            return page
        for p in console.procs:
            assert p.running(), f"{p.service} died:\n{p.log_tail()}"
        time.sleep(1)
    raise AssertionError("the campaign page never showed completion")


def test_a_campaign_created_and_sent_from_the_console_reaches_the_sink(settings):
    with console_on_pipeline(settings) as console, httpx.Client(base_url=console.base, timeout=30, follow_redirects=True) as web:
        token = csrf(web.get("/console/signin").text)
        assert web.post("/console/signin", data={"csrf": token, "api_key": console.key}).status_code == 200
        created = web.post("/console/campaigns/new", data={
            "csrf": token, "action": "create", "name": "Console launch", "subject": "Hi {{ first_name }}",
            "from_address": "news@example.com", "body_text": "Hello {{ first_name }}",
            "body_html": "<p>Hello {{ first_name }}</p>", "list_ids": console.list_id})
        assert created.status_code == 200, created.text
        campaign_id = str(created.url).split("/console/campaigns/")[1].split("?")[0]
        assert f'value="{console.list_id}"' in created.text, "audience not carried to the send form"
        sent = web.post(f"/console/campaigns/{campaign_id}/send",
                        data={"csrf": token, "list_ids": console.list_id})
        assert sent.status_code == 200 and "SendCampaign accepted" in sent.text
        page = wait_completed(console, lambda: web.get(f"/console/campaigns/{campaign_id}/progress").text)
        full = web.get(f"/console/campaigns/{campaign_id}").text
        mails = [m for m in console.sink.messages if header(m, "X-Campaign-ID") == campaign_id]

    assert 'data-percent="100.0"' in page and "100.0 %" in page
    assert "sent: 5" in full and "No failures." in full
    assert sorted(m["rcpt_tos"][0] for m in mails) == sorted(
        normalise_email(f"reader{i}@example.org") for i in range(RECIPIENTS))
    assert {m["subject"] for m in mails} == {f"Hi R{i}" for i in range(RECIPIENTS)}


def test_a_browser_signs_in_creates_and_sends_a_campaign(settings, browser, tmp_path):  # noqa: F811
    def fill(element_id: str, value: str) -> None:
        field = browser.find_element("id", element_id)
        field.clear()
        field.send_keys(value)

    with console_on_pipeline(settings) as console:
        browser.set_window_size(1280, 900)
        browser.get(f"{console.base}/console/signin")
        fill("api_key", console.key)
        browser.find_element("css selector", "form[action='/console/signin'] button").click()
        browser.find_element("link text", "New campaign").click()
        fill("name", "Browser launch")
        fill("subject", "Hi {{ first_name }}")
        fill("from_address", "news@example.com")
        fill("body_html", "<p>Hello {{ first_name }}</p>")
        fill("list_ids", console.list_id)
        browser.find_element("css selector", "button[value='preview']").click()
        preview = browser.find_element("id", "preview-subject").text
        browser.find_element("css selector", "button[value='create']").click()
        campaign_id = browser.current_url.split("/console/campaigns/")[1].split("?")[0]
        browser.find_element("css selector", f"form[action$='/{campaign_id}/send'] button").click()
        wait_completed(console, lambda: browser.find_element("id", "progress").get_attribute("outerHTML"))
        browser.save_screenshot(str(tmp_path / "console-1280.png"))
        browser.set_window_size(390, 844)
        browser.save_screenshot(str(tmp_path / "console-390.png"))
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        percent = browser.find_element("id", "progress").get_attribute("data-percent")
        mails = [m for m in console.sink.messages if header(m, "X-Campaign-ID") == campaign_id]

    assert preview == "Hi Ada"
    assert percent == "100.0" and len(mails) == RECIPIENTS
    assert overflow <= 0, f"the page scrolls sideways at 390 px by {overflow} px"
    assert (tmp_path / "console-1280.png").stat().st_size > 0 and (tmp_path / "console-390.png").stat().st_size > 0
    print(f"screenshots: {tmp_path}")
