"""Engagement end to end: a tracked campaign through the real pipeline (command handler,
hydrator, sender, projector with its engagement lane, and the tracker, each a process, with
real Kafka, PostgreSQL and SMTP sink). The test reads the mail the sink recorded and acts as
the recipients' mail clients would over HTTP against the running tracker: some as people
(pixels fetched, links followed), some as machines (an image proxy, HEAD requests, a scanner's
agent, every link of a mail at once), and one person unsubscribes with the one-click link of
the mail's List-Unsubscribe (twice). The engagement API's counts are then exactly what was
done: unique and total opens and clicks, human and machine, per link, and unsubscribes.
"""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from schemas.base import normalise_email
from schemas.commands import CreateCampaign, SendCampaign
from schemas.contacts import ContactUpserted, contact_id_for, contact_key
from schemas.envelope import wrap
from services.api.app import create_app
from services.api.auth import ApiKeys
from services.common.topics import COMMANDS, CONTACTS
from services.engagement.tokens import TrackingKeys
from services.smtp_sink import SinkConfig, SmtpSink, header
from services.tracker.app import PIXEL
from tests.integration.test_api import serving
from tests.kafka_io import publish
from tests.ports import free_ports
from tests.service_process import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
SERVICES = ("command_handler", "hydrator", "sender", "projector", "tracker")
TRACKER_KEYS = "e2e:engagement-secret-0123456789"
UNSUBSCRIBE_SECRET = "e2e-unsubscribe-secret-0123456789"
# A click sooner than this after delivery is a scanner's: small, so people can click here.
SCANNER_WINDOW_SECONDS = 1
LINK_A = "https://shop.example.com/spring?ref=mail"
LINK_B = "https://shop.example.com/summer"
HTML = (f'<p>Hi {{{{ first_name }}}}</p><p><a href="{LINK_A}">Spring</a> or '
        f'<a href="{LINK_B}">Summer</a></p></body>')
CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0"
APPLE_PROXY = "Mozilla/5.0"  # Apple Mail Privacy Protection's bare agent
SCANNER = "Mimecast URL Protect/1.0"
# Who does what: people first, then machines; "quiet" does nothing.
ROLES = ("ann", "bob", "cat", "apple", "head", "gateway", "burst", "quiet")
EXPECTED = {
    "opens_unique_human": 3, "opens_total_human": 4,  # ann twice, bob, cat
    "opens_unique_machine": 3, "opens_total_machine": 3,  # apple, head, gateway
    "clicks_unique_human": 2, "clicks_total_human": 3,  # ann A twice, bob B
    "clicks_unique_machine": 3, "clicks_total_machine": 5,  # head A, gateway A+B, burst A+B
    "bounces_hard": 0, "bounces_soft": 0, "complaints": 0,
    "unsubscribes": 1,  # cat, by one-click POST, twice: one event
}
# Per link: (index, url, unique human, total human, unique machine, total machine).
EXPECTED_LINKS = [(0, LINK_A, 1, 2, 3, 3), (1, LINK_B, 1, 1, 2, 2)]


def tracked_links(mail: dict[str, Any], base: str) -> tuple[str, list[str]]:
    """The mail's pixel URL and its distinct click URLs in order of appearance."""
    html = mail["html"]
    [pixel] = re.findall(re.escape(base) + r"/o/[^\"]+\.gif", html)
    clicks = list(dict.fromkeys(re.findall(re.escape(base) + r"/c/[^\"]+", html)))
    return pixel, clicks


def act(role: str, pixel: str, links: list[str]) -> None:
    """What one recipient's mail client (or the machine in front of it) does."""
    def get(url: str, agent: str) -> httpx.Response:
        return httpx.get(url, headers={"User-Agent": agent}, follow_redirects=False, timeout=10)

    def clicked(answer: httpx.Response, link: str) -> None:
        assert answer.status_code == 302, answer.text
        assert answer.headers["location"] == link
    a, b = links
    if role == "ann":
        for _ in range(2):  # opened twice (unique once), link A followed twice
            seen = get(pixel, THUNDERBIRD)
            assert seen.status_code == 200 and seen.content == PIXEL
        clicked(get(a, CHROME), LINK_A)
        clicked(get(a, CHROME), LINK_A)
    elif role == "bob":
        assert get(pixel, CHROME).status_code == 200
        clicked(get(b, CHROME), LINK_B)
    elif role == "cat":
        assert get(pixel, THUNDERBIRD).status_code == 200
    elif role == "apple":
        assert get(pixel, APPLE_PROXY).status_code == 200
    elif role == "head":  # a gateway checking the pixel and the first link without a body
        assert httpx.head(pixel, headers={"User-Agent": CHROME}, timeout=10).status_code == 200
        answer = httpx.head(a, headers={"User-Agent": CHROME}, timeout=10)
        clicked(answer, LINK_A)
    elif role == "gateway":
        assert get(pixel, SCANNER).status_code == 200
        clicked(get(a, SCANNER), LINK_A)
        clicked(get(b, SCANNER), LINK_B)
    elif role == "burst":  # a browser-like scanner: every link at the same moment
        with ThreadPoolExecutor(2) as pool:
            for answer, link in zip(pool.map(lambda u: get(u, CHROME), links), (LINK_A, LINK_B),
                                    strict=True):
                clicked(answer, link)


def test_opens_and_clicks_of_people_and_machines_are_counted_exactly(settings) -> None:
    tenant = f"eng-{uuid.uuid4().hex[:8]}"
    emails = {role: normalise_email(f"{role}-{uuid.uuid4().hex[:6]}@example.org")
              for role in ROLES}
    contacts = {role: contact_id_for(tenant, email) for role, email in emails.items()}
    role_of = {email: role for role, email in emails.items()}
    publish(settings, CONTACTS, [
        (contact_key(tenant, contacts[role]),
         wrap(ContactUpserted(contact_id=contacts[role], email=email, first_name="Kay",
                              lists=["news"]), tenant_id=tenant, aggregate_id=contacts[role]))
        for role, email in emails.items()])
    campaign = f"cmp-{uuid.uuid4().hex[:12]}"
    create = CreateCampaign(name="Spring", subject="Spring", from_address="news@example.com",
                            body_text="Hi {{ first_name }}", body_html=HTML, track_opens=True,
                            track_clicks=True)
    commands = [(campaign.encode(), wrap(create, tenant_id=tenant, aggregate_id=campaign)),
                (campaign.encode(), wrap(SendCampaign(list_ids=["news"]), tenant_id=tenant,
                                         aggregate_id=campaign))]
    [tracker_port] = free_ports(1)
    base = f"http://127.0.0.1:{tracker_port}"
    marks = {"TRACKER_KEYS": TRACKER_KEYS, "TRACKER_PUBLIC_URL": base}
    env = {"sender": {**marks, "UNSUBSCRIBE_SECRET": UNSUBSCRIBE_SECRET,
                      "PUBLIC_API_URL": "https://api.example.net"},
           "tracker": {**marks, "TRACKER_PORT": str(tracker_port),
                       "TRACKER_SCANNER_WINDOW_SECONDS": str(SCANNER_WINDOW_SECONDS)}}
    api_key = uuid.uuid4().hex

    with SmtpSink(SinkConfig(port=0)) as sink:
        run = settings.replace(smtp_port=sink.port)
        procs = [ServiceProcess(name, run, None, **env.get(name, {})).start() for name in SERVICES]

        def alive() -> None:
            for p in procs:
                assert p.running(), f"{p.service} died:\n{p.log_tail()}"
        try:
            publish(settings, COMMANDS, commands)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                mails = [m for m in sink.messages if header(m, "X-Campaign-ID") == campaign]
                if len(mails) >= len(ROLES):
                    break
                alive()
                time.sleep(0.5)
            assert len(mails) == len(ROLES)
            by_role = {role_of[m["rcpt_tos"][0]]: tracked_links(m, base) for m in mails}
            [unsubscribe_url] = [str(header(m, "List-Unsubscribe")).strip("<>") for m in mails
                                 if role_of[m["rcpt_tos"][0]] == "cat"]
            assert all(len(links) == 2 for _, links in by_role.values())

            # People click after the scanner window; the tracker must be answering first.
            keys = TrackingKeys.parse(TRACKER_KEYS)
            sent_at = max(keys.verify(pixel.rsplit("/", 1)[1][:-4]).sent_at
                          for pixel, _ in by_role.values())
            while time.monotonic() < deadline:
                alive()
                try:
                    if httpx.get(f"{base}/c/not-a-token", timeout=2).status_code == 400:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            time.sleep(max(0.0, sent_at + SCANNER_WINDOW_SECONDS + 1.5 - time.time()))
            for role, (pixel, links) in by_role.items():
                act(role, pixel, links)

            app = create_app(settings, ApiKeys([(tenant, api_key)]),
                             unsubscribe_secret=UNSUBSCRIBE_SECRET.encode())
            with serving(app) as api, httpx.Client(
                    base_url=api, timeout=10,
                    headers={"Authorization": f"Bearer {api_key}"}) as http:
                # The mail client's one-click POST (RFC 8058) to the List-Unsubscribe link,
                # sent twice: the second is the same event.
                assert unsubscribe_url.startswith("https://api.example.net/unsubscribe?token=")
                for _ in range(2):
                    done = http.post(api + unsubscribe_url.removeprefix("https://api.example.net"),
                                     data={"List-Unsubscribe": "One-Click"})
                    assert done.status_code == 200, done.text
                body: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    alive()
                    answer = http.get(f"/campaigns/{campaign}/engagement")
                    body = answer.json() if answer.status_code == 200 else {}
                    if body.get("sent") == len(ROLES) and body["counts"] == EXPECTED:
                        break
                    time.sleep(0.5)
                time.sleep(2)  # nothing more may arrive: the counts stay exact
                body = http.get(f"/campaigns/{campaign}/engagement").json()
                links = http.get(f"/campaigns/{campaign}/engagement/links").json()["links"]
                history = {role: http.get(
                    f"/campaigns/{campaign}/recipients/{contacts[role]}/engagement").json()
                    for role in ("ann", "burst", "head", "gateway")}
        finally:
            codes = {p.service: p.stop() for p in procs}

    assert codes == dict.fromkeys(SERVICES, 0)
    assert body["sent"] == len(ROLES)
    assert body["counts"] == EXPECTED
    assert body["rates"]["opens_unique_human"] == round(3 / len(ROLES), 4)
    assert [(lk["link_index"], lk["url"], lk["unique_human"], lk["total_human"],
             lk["unique_machine"], lk["total_machine"]) for lk in links] == EXPECTED_LINKS

    def reasons(role: str) -> list[tuple[str, bool, str | None]]:
        return sorted((e["kind"], e["machine"], e["machine_reason"])
                      for e in history[role]["events"])
    assert reasons("ann") == [("click", False, None)] * 2 + [("open", False, None)] * 2
    assert reasons("burst") == [("click", True, "all_links_at_once")] * 2
    assert reasons("head") == [("click", True, "head_request"), ("open", True, "head_request")]
    assert reasons("gateway") == [("click", True, "scanner_agent:mimecast")] * 2 + [
        ("open", True, "scanner_agent:mimecast")]
