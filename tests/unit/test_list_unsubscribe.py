"""Mails carry List-Unsubscribe (a signed one-click link) and List-Unsubscribe-Post."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from services.common.settings import SenderSettings
from services.common.unsubscribe_tokens import InvalidToken, UnsubscribeClaim, verify
from services.sender.list_unsubscribe import ListUnsubscribe
from services.sender.mime import build_mail
from services.sender.render import render
from tests.unit.test_mime import recipient


def test_the_link_carries_a_token_that_verifies_to_this_recipient():
    links = ListUnsubscribe(secret=b"s3cret", base_url="https://api.example.com")
    r = recipient()
    mail = build_mail(r, render(r), datetime(2026, 11, 29, tzinfo=UTC),
                      links.headers("acme", r.contact_id, r.campaign_id))
    msg = message_from_bytes(mail.content, policy=policy.default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = urlparse(str(msg["List-Unsubscribe"]).strip("<>"))
    assert (url.scheme, url.netloc, url.path) == ("https", "api.example.com", "/unsubscribe")
    token = unquote(parse_qs(url.query)["token"][0])
    assert verify(b"s3cret", token) == UnsubscribeClaim("acme", r.contact_id, r.campaign_id)
    with pytest.raises(InvalidToken):
        verify(b"another secret", token)


def test_without_a_secret_there_are_no_links(monkeypatch):
    monkeypatch.delenv("UNSUBSCRIBE_SECRET", raising=False)
    assert ListUnsubscribe.from_settings(SenderSettings()) is None
    monkeypatch.setenv("UNSUBSCRIBE_SECRET", "x")
    monkeypatch.setenv("PUBLIC_API_URL", "https://mail.example.com/")
    assert ListUnsubscribe.from_settings(SenderSettings()) == ListUnsubscribe(b"x", "https://mail.example.com")
