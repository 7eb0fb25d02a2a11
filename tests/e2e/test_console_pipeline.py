"""The console end to end: a campaign created and sent from the console's forms goes through
the gateway and the real pipeline (command handler, hydrator, sender, projector, completion as
processes) to the SMTP sink, and the campaign page then shows 100 % and completed. Once over
HTTP, once in headless Chromium (Debian's chromium + chromedriver, installed by .ci/run): a
person imports the readers from a CSV on the import page (one bad row reported), picks the
audience with the picker from the keyboard (its live estimate updates),
previews, test-sends, sends and watches it finish, then pauses and resumes a second, rate-limited
campaign and sees it finish too; every control on the pages has a label; screenshots at 1280
and 390 px stay under the test's tmp dir."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.keys import Keys

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
# The second campaign's list, mailed at SLOW_RATE so that it is still sending when paused.
SLOW_LIST, SLOW_RECIPIENTS, SLOW_RATE = "slow", 24, "2/s"
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
def console_on_pipeline(settings, slow_list: bool = False, import_readers: bool = False) -> Iterator[Console]:
    """`import_readers`: the readers are left for the test to import through the console."""
    tenant, key, list_id = f"t-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, "vip"
    members = [] if import_readers else [(f"reader{i}@example.org", list_id) for i in range(RECIPIENTS)]
    if slow_list:
        members += [(f"slow{i}@example.org", SLOW_LIST) for i in range(SLOW_RECIPIENTS)]
    records = []
    for i, (address, list_name) in enumerate(members):
        email = normalise_email(address)
        cid = contact_id_for(tenant, email)
        records.append((contact_key(tenant, cid), wrap(
            ContactUpserted(contact_id=cid, email=email, first_name=f"R{i}", lists=[list_name]),
            tenant_id=tenant, aggregate_id=cid)))
    publish(settings, CONTACTS, records)
    with SmtpSink(SinkConfig(port=0)) as sink:
        run = settings.replace(smtp_port=sink.port)
        env = {"SENDER_TENANT_RATE": SLOW_RATE} if slow_list else {}
        procs = [ServiceProcess(name, run, None, **env).start() for name in SERVICES]
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


SIDEWAYS_JS = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
# Controls without an accessible name: no <label for>, no wrapping <label>, no aria-label(ledby),
# and (buttons) no text.
UNLABELLED_JS = """
return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button'))
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
               && !e.getAttribute('aria-labelledby') && !(e.tagName === 'BUTTON' && e.textContent.trim()))
  .map(e => e.outerHTML.slice(0, 120));
"""


def test_a_browser_picks_an_audience_sends_then_pauses_and_resumes_another(settings, browser, tmp_path):  # noqa: F811
    def fill(element_id: str, value: str) -> None:
        field = browser.find_element("id", element_id)
        field.clear()
        field.send_keys(value)

    def attribute(element_id: str, name: str) -> str:
        # htmx swaps the polled panels: re-find the element when it was replaced meanwhile.
        for _ in range(20):
            try:
                return browser.find_element("id", element_id).get_attribute(name) or ""
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"#{element_id} kept being replaced")

    def wait_for(element_id: str, name: str, wanted: str, timeout: float = DONE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while attribute(element_id, name) != wanted:
            assert time.monotonic() < deadline, (
                f"#{element_id} {name} never became {wanted!r}:\n{browser.find_element('tag name', 'main').text}")
            for p in console.procs:
                assert p.running(), f"{p.service} died:\n{p.log_tail()}"
            time.sleep(0.3)

    def pick_list(list_id: str) -> None:
        """Ticks a list in the picker from the keyboard, as a person tabbing through would."""
        box = browser.find_element("css selector", f"#audience input[name='list_ids'][value='{list_id}']")
        browser.execute_script("arguments[0].focus()", box)
        box.send_keys(Keys.SPACE)
        assert box.is_selected()

    def new_campaign(name: str, list_id: str, expected: int) -> str:
        browser.find_element("link text", "New campaign").click()
        fill("name", name)
        fill("subject", "Hi {{ first_name }}")
        fill("from_address", "news@example.com")
        fill("body_html", "<p>Hello {{ first_name }}</p>")
        assert attribute("estimate", "data-mailable") == "0"
        pick_list(list_id)
        wait_for("estimate", "data-mailable", str(expected), timeout=15)
        unlabelled.extend(browser.execute_script(UNLABELLED_JS))
        browser.find_element("css selector", "button[value='create']").click()
        return browser.current_url.split("/console/campaigns/")[1].split("?")[0]

    unlabelled: list[str] = []
    readers = tmp_path / "readers.csv"
    readers.write_text("email,first_name\n" + "".join(f"reader{i}@example.org,R{i}\n" for i in range(RECIPIENTS))
                       + "not an address,Nobody\n", encoding="utf-8")
    with console_on_pipeline(settings, slow_list=True, import_readers=True) as console:
        browser.set_window_size(1280, 900)
        browser.get(f"{console.base}/console/signin")
        fill("api_key", console.key)
        browser.find_element("css selector", "form[action='/console/signin'] button").click()
        # The readers come in as a person imports them: a CSV uploaded on the import page.
        browser.find_element("link text", "Import CSV").click()
        browser.find_element("id", "file").send_keys(str(readers))
        fill("list_id", console.list_id)
        unlabelled.extend(browser.execute_script(UNLABELLED_JS))
        browser.find_element("css selector", "form[action='/console/imports'] button").click()
        wait_for("import-progress", "data-state", "done", timeout=60)
        imported = browser.find_element("css selector", "#import-progress .imported").text
        rejected = browser.find_element("css selector", "#import-progress .rejected").text
        rejected_lines = browser.find_element("css selector", "table.rejected-rows td").text
        browser.save_screenshot(str(tmp_path / "import-1280.png"))
        browser.find_element("link text", "Lists").click()
        # The contacts were just published: reload until the projector has them all.
        deadline = time.monotonic() + 60
        while (listed := {e.get_attribute("data-list-id"): e.find_element("css selector", "td:nth-child(2)").text
                          for e in browser.find_elements("css selector", "tr.list")}) != {
                console.list_id: str(RECIPIENTS), SLOW_LIST: str(SLOW_RECIPIENTS)}:
            assert time.monotonic() < deadline, f"the lists page never showed both lists: {listed}"
            time.sleep(0.5)
            browser.refresh()
        unlabelled.extend(browser.execute_script(UNLABELLED_JS))

        # The first campaign: picked, previewed, sent, watched to 100 %.
        browser.find_element("link text", "New campaign").click()
        fill("name", "Browser launch")
        fill("subject", "Hi {{ first_name }}")
        fill("from_address", "news@example.com")
        fill("body_html", "<p>Hello {{ first_name }}</p>")
        pick_list(console.list_id)
        wait_for("estimate", "data-mailable", str(RECIPIENTS), timeout=15)
        browser.save_screenshot(str(tmp_path / "picker-1280.png"))
        browser.find_element("css selector", "button[value='preview']").click()
        preview = browser.find_element("id", "preview-subject").text
        # The preview's page keeps the picked audience.
        assert browser.find_element("css selector", f"#audience input[value='{console.list_id}']").is_selected()
        browser.find_element("css selector", "button[value='create']").click()
        first = browser.current_url.split("/console/campaigns/")[1].split("?")[0]
        assert attribute("estimate", "data-mailable") == str(RECIPIENTS), "audience not carried"
        unlabelled.extend(browser.execute_script(UNLABELLED_JS))
        fill("test-addresses", "proof@example.org")
        browser.find_element("css selector", f"form[action$='/{first}/test'] button").click()
        deadline = time.monotonic() + 60
        while not (proofs := [m for m in console.sink.messages if m["rcpt_tos"] == ["proof@example.org"]]):
            assert time.monotonic() < deadline, "the test send never reached the sink"
            time.sleep(0.3)
        # The test send's answer is the campaign page afresh: the audience is picked again.
        pick_list(console.list_id)
        wait_for("estimate", "data-mailable", str(RECIPIENTS), timeout=15)
        browser.find_element("id", "send-now").click()
        wait_for("progress", "data-status", "completed")
        browser.refresh()  # the chart is drawn when the page is rendered
        svg = browser.find_element("css selector", "svg#throughput")
        chart = svg.get_attribute("data-total")
        browser.execute_script("arguments[0].scrollIntoView()", svg)
        chart_height = browser.execute_script("return arguments[0].getBoundingClientRect().height", svg)
        browser.save_screenshot(str(tmp_path / "chart-1280.png"))
        browser.save_screenshot(str(tmp_path / "console-1280.png"))
        browser.set_window_size(390, 844)
        browser.save_screenshot(str(tmp_path / "console-390.png"))
        percent = attribute("progress", "data-percent")
        overflow = {"campaign": browser.execute_script(SIDEWAYS_JS)}
        for name, path in (("new", "/console/campaigns/new?list_ids=vip"), ("lists", "/console/lists"),
                           ("list", f"/console/lists/{SLOW_LIST}")):
            browser.get(f"{console.base}{path}")
            overflow[name] = browser.execute_script(SIDEWAYS_JS)
        browser.save_screenshot(str(tmp_path / "list-390.png"))
        browser.set_window_size(1280, 900)

        # The second campaign, rate-limited: paused while sending, resumed, finished.
        second = new_campaign("Slow one", SLOW_LIST, SLOW_RECIPIENTS)
        browser.find_element("id", "send-now").click()
        fill("pause-reason", "checking a link")
        browser.find_element("css selector", f"form[action$='/{second}/pause'] button").click()
        wait_for("progress", "data-status", "paused", timeout=60)
        sent_when_paused = int(attribute("progress", "data-sent"))
        time.sleep(3)
        sent_later = int(attribute("progress", "data-sent"))
        browser.find_element("css selector", f"form[action$='/{second}/resume'] button").click()
        wait_for("progress", "data-status", "completed")
        rejections = browser.find_element("css selector", "ul.rejections").text
        mails = [m for m in console.sink.messages
                 if header(m, "X-Campaign-ID") == first and m["rcpt_tos"] != ["proof@example.org"]]
        slow_mails = {m["rcpt_tos"][0] for m in console.sink.messages if header(m, "X-Campaign-ID") == second}

    assert (imported, rejected, rejected_lines) == (str(RECIPIENTS), "1", str(RECIPIENTS + 2))
    assert len(proofs) == 1
    assert preview == "Hi Ada"
    assert percent == "100.0" and len(mails) == RECIPIENTS and chart == str(RECIPIENTS)
    assert chart_height > 100, f"the chart is drawn {chart_height} px high"
    assert all(px <= 0 for px in overflow.values()), f"pages scroll sideways at 390 px: {overflow}"
    assert sent_when_paused < SLOW_RECIPIENTS, "the second campaign finished before it was paused"
    assert sent_later - sent_when_paused <= 8, "sending went on while paused"  # in flight at most
    assert rejections == "None."
    assert slow_mails == {normalise_email(f"slow{i}@example.org") for i in range(SLOW_RECIPIENTS)}
    assert not unlabelled, f"controls without a label: {unlabelled}"
    assert (tmp_path / "console-1280.png").stat().st_size > 0 and (tmp_path / "console-390.png").stat().st_size > 0
    print(f"screenshots: {tmp_path}")
