"""The receiver's SMTP handler without a network: RCPT filtering, the reply to each outcome,
and soft bounces in a row through a contact history."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiosmtpd.smtp import Envelope

from schemas.contacts import ContactSuppressed
from services.bounces.events import Outgoing
from services.bounces.parse import BounceContext
from services.bounces.policy import ContactOutcome
from services.bounces.publisher import PublishFailed
from services.bounces.receiver import BounceHandler
from services.bounces.verp import VerpKeys, verp_address
from tests.bounce_messages import dsn

DOMAIN = "bounces.example.com"
KEYS = VerpKeys.parse("k:handler-secret")
VERP = verp_address(KEYS, DOMAIN, "acme", "c3", "p1")
CONTEXT = BounceContext(DOMAIN, KEYS)


class Publish:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.records: list[Outgoing] = []

    async def __call__(self, records: list[Outgoing]) -> None:
        if self.fail:
            raise PublishFailed("broker away")
        self.records.extend(records)


def _deliver(handler: BounceHandler, rcpts: list[str], raw: bytes) -> tuple[list[str], str | None]:
    async def session() -> tuple[list[str], str | None]:
        envelope = Envelope()
        replies = [await handler.handle_RCPT(None, None, envelope, rcpt, []) for rcpt in rcpts]  # type: ignore[arg-type]
        if not envelope.rcpt_tos:
            return replies, None
        envelope.original_content = raw
        return replies, await handler.handle_DATA(None, None, envelope)  # type: ignore[arg-type]

    return asyncio.run(session())


def test_only_bounce_addresses_are_taken():
    handler = BounceHandler(CONTEXT, Publish())
    # No token anywhere (the VERP address is not even in the report's To:): nobody to record.
    replies, data = _deliver(handler, ["ann@example.net", f"BOUNCES+X@{DOMAIN.upper()}"], dsn(to="postmaster"))
    assert replies[0].startswith("550") and replies[1].startswith("250")
    assert data is not None and data.startswith("250 2.0.0 OK (not attributable)")
    assert handler.stats["refused_recipient"] == 1 and handler.stats["unparseable"] == 1


def test_replies_follow_the_broker():
    published = Publish()
    assert _deliver(BounceHandler(CONTEXT, published), [VERP], dsn(to=VERP))[1] == "250 2.0.0 OK"
    assert [r.envelope.type for r in published.records] == ["EmailBounced", "ContactSuppressed"]
    deferred = _deliver(BounceHandler(CONTEXT, Publish(fail=True)), [VERP], dsn(to=VERP))[1]
    assert deferred is not None and deferred.startswith("451 4.3.0")


def test_soft_bounces_of_campaigns_in_a_row_suppress_at_the_limit():
    at = datetime(2026, 2, 1, tzinfo=UTC)
    past = [ContactOutcome(at, "c1", "soft_bounce"), ContactOutcome(at.replace(day=8), "c2", "soft_bounce")]
    soft = dsn(to=VERP, action="delayed", status="4.2.2")
    published = Publish()
    handler = BounceHandler(CONTEXT, published, soft_limit=3, history=lambda tenant, contact: past)
    assert _deliver(handler, [VERP], soft)[1] == "250 2.0.0 OK"
    assert published.records[-1].envelope.payload["reason"] == "hard_bounce"
    assert ContactSuppressed.model_validate(published.records[-1].envelope.payload).detail.startswith(
        "3 soft bounces in a row")
    broken = [*past, ContactOutcome(at.replace(day=15), "c2b", "engaged")]
    quiet = Publish()
    handler = BounceHandler(CONTEXT, quiet, soft_limit=3, history=lambda tenant, contact: broken)
    _deliver(handler, [VERP], soft)
    assert [r.envelope.type for r in quiet.records] == ["EmailBounced"]
