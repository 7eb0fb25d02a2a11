"""Unsubscribe tokens: a signed claim round-trips; anything altered or foreign is refused."""

from __future__ import annotations

import pytest

from services.common.unsubscribe_tokens import InvalidToken, UnsubscribeClaim, sign, verify

SECRET = b"s3cret-key-for-tests-only"


def test_a_signed_token_verifies_to_its_claim_and_is_url_safe() -> None:
    token = sign(SECRET, "acme", "c-9f2", "camp:2030-spring")
    assert verify(SECRET, token) == UnsubscribeClaim("acme", "c-9f2", "camp:2030-spring")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_another_secret_or_any_altered_character_is_refused() -> None:
    token = sign(SECRET, "acme", "c1", "camp-1")
    with pytest.raises(InvalidToken):
        verify(b"another secret", token)
    for i in range(len(token)):
        for replacement in ("A", "-"):
            altered = token[:i] + replacement + token[i + 1:]
            if altered == token:
                continue
            with pytest.raises(InvalidToken):
                verify(SECRET, altered)


def test_a_claim_cannot_be_moved_to_another_tenant() -> None:
    body, signature = sign(SECRET, "acme", "c1", "camp-1").split(".")
    forged_body = sign(SECRET, "globex", "c1", "camp-1").split(".")[0]
    with pytest.raises(InvalidToken):
        verify(SECRET, f"{forged_body}.{signature}")
    assert verify(SECRET, f"{body}.{signature}").tenant_id == "acme"


@pytest.mark.parametrize("token", [
    "", ".", "abc", "a.b.c", "not base64!.x", "x" * 600, "YQ.YQ", "dTEKYQ.",
])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify(SECRET, token)


def test_ids_and_secret_are_checked_when_signing() -> None:
    with pytest.raises(ValueError, match="valid ids"):
        sign(SECRET, "acme", "c1\nforged", "camp-1")
    with pytest.raises(ValueError, match="empty"):
        sign(b"", "acme", "c1", "camp-1")


def test_every_other_spelling_of_a_token_is_refused() -> None:
    token = sign(SECRET, "acme", "c1", "camp-1")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = len(token) - 1
    others = [token[:last] + c for c in alphabet if c != token[last]]
    for other in others:
        with pytest.raises(InvalidToken):
            verify(SECRET, other)
