"""Tracking tokens: a signed claim round-trips under any configured key; anything altered,
foreign, retired or oversized is refused with its reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engagement.tokens import (
    MAX_TOKEN_LENGTH,
    InvalidTrackingToken,
    Kind,
    Refusal,
    TrackingClaim,
    TrackingKeys,
)

OLD = ("k2025", b"an-old-secret-of-32-bytes-------")
NEW = ("k2026", b"a-new-secret-of-32-bytes--------")
KEYS = TrackingKeys([NEW, OLD])
URL = "https://shop.example/spring?utm_source=mail&x=1#top"
URL_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def click(keys: TrackingKeys = KEYS, url: str = URL, index: int = 1, links: int = 3) -> str:
    return keys.sign_click("acme", "camp:spring", "c-42", sent_at=1_800_000_000,
                           link_index=index, links_in_mail=links, url=url)


def refusal(keys: TrackingKeys, token: str) -> Refusal:
    with pytest.raises(InvalidTrackingToken) as refused:
        keys.verify(token)
    return refused.value.reason


def test_open_and_click_tokens_verify_to_their_claims_and_are_url_safe() -> None:
    opened = KEYS.sign_open("acme", "camp:spring", "c-42", sent_at=1_800_000_000)
    assert KEYS.verify(opened) == TrackingClaim(Kind.OPEN, "acme", "camp:spring", "c-42", 1_800_000_000)
    clicked = click()
    assert KEYS.verify(clicked) == TrackingClaim(
        Kind.CLICK, "acme", "camp:spring", "c-42", 1_800_000_000, 1, 3, URL)
    assert set(opened) <= URL_SAFE and set(clicked) <= URL_SAFE
    assert opened.startswith("k2026.") and clicked.startswith("k2026.")


def test_the_first_key_signs_and_every_key_verifies() -> None:
    old_only = TrackingKeys([OLD])
    token = click(old_only)
    assert token.startswith("k2025.")
    assert KEYS.verify(token).url == URL  # still verified after the rotation
    assert refusal(TrackingKeys([NEW]), token) is Refusal.UNKNOWN_KEY  # the old key retired


def test_a_foreign_secret_under_a_known_key_id_is_a_bad_signature() -> None:
    foreign = TrackingKeys([("k2026", b"somebody-elses-secret-0123456789")])
    assert refusal(KEYS, click(foreign)) is Refusal.BAD_SIGNATURE


def test_a_token_cannot_be_moved_under_another_key_id() -> None:
    token = click(TrackingKeys([OLD]))
    _, body, mac = token.split(".")
    same_secret = TrackingKeys([("other", OLD[1])])
    assert refusal(same_secret, f"other.{body}.{mac}") is Refusal.BAD_SIGNATURE


def test_any_altered_character_is_refused() -> None:
    token = click()
    for i in range(len(token)):
        for replacement in ("A", "-", "."):
            altered = token[:i] + replacement + token[i + 1:]
            if altered != token:
                with pytest.raises(InvalidTrackingToken):
                    KEYS.verify(altered)


def test_the_link_of_another_token_cannot_be_swapped_in() -> None:
    key_id, _, mac = click().split(".")
    evil_body = click(url="https://evil.example/").split(".")[1]
    assert refusal(KEYS, f"{key_id}.{evil_body}.{mac}") is Refusal.BAD_SIGNATURE


@pytest.mark.parametrize("token", [
    "", ".", "..", "a.b", "a.b.c.d", "k2026.not base64!.x", "k2026.YQ.YQ=", "k 1.YQ.YQ",
    "x" * (MAX_TOKEN_LENGTH + 1), "k2026." + "A" * MAX_TOKEN_LENGTH + ".AA",
])
def test_malformed_tokens_are_refused_as_malformed(token: str) -> None:
    with pytest.raises(InvalidTrackingToken) as refused:
        KEYS.verify(token)
    assert refused.value.malformed


def test_a_well_formed_token_of_no_configured_key_is_not_malformed() -> None:
    reason = refusal(KEYS, "k1999.dDEK.AAAA")
    assert reason is Refusal.UNKNOWN_KEY


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "mailto:a@example.com", "/relative", "https://exa mple.com/",
    "https://bücher.example/", "https://example.com/\r\nSet-Cookie: x", "https://x.example/" + "a" * 2100,
])
def test_only_printable_http_links_within_the_bound_are_signed(url: str) -> None:
    with pytest.raises(ValueError):
        click(url=url)


def test_bad_ids_indices_and_keys_are_refused_when_signing() -> None:
    with pytest.raises(ValueError):
        KEYS.sign_open("acme\nx", "camp", "c", sent_at=1)
    with pytest.raises(ValueError):
        click(index=3, links=3)
    with pytest.raises(ValueError):
        KEYS.sign_open("acme", "camp", "c", sent_at=-1)
    with pytest.raises(ValueError):
        TrackingKeys([("k1", b"short")])
    with pytest.raises(ValueError):
        TrackingKeys([NEW, NEW])
    with pytest.raises(ValueError):
        TrackingKeys([])


def test_keys_parse_from_their_setting() -> None:
    keys = TrackingKeys.parse(" k2026:a-new-secret-of-32-bytes--------, k2025:an-old-secret-of-32-bytes------- ")
    assert keys.signing_key_id == "k2026"
    assert keys.verify(click(TrackingKeys([OLD]))).contact_id == "c-42"
    with pytest.raises(ValueError):
        TrackingKeys.parse("no-colon-here-but-long-enough")


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}", fullmatch=True)
urls = st.from_regex(r"https?://[a-z0-9.-]{1,30}(/[!-~]{0,200})?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(tenant=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), campaign=ids,
       contact=ids, url=urls, links=st.integers(1, 50), data=st.data(),
       sent_at=st.integers(0, 2**40))
def test_any_valid_claim_round_trips(tenant: str, campaign: str, contact: str, url: str, links: int,
                                     data: st.DataObject, sent_at: int) -> None:
    index = data.draw(st.integers(0, links - 1))
    token = KEYS.sign_click(tenant, campaign, contact, sent_at=sent_at, link_index=index,
                            links_in_mail=links, url=url)
    assert len(token) <= MAX_TOKEN_LENGTH and set(token) <= URL_SAFE
    assert KEYS.verify(token) == TrackingClaim(Kind.CLICK, tenant, campaign, contact, sent_at,
                                               index, links, url)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_input_is_refused_never_crashes(text: str) -> None:
    with pytest.raises(InvalidTrackingToken):
        KEYS.verify(text)


def test_the_longest_claim_fits_the_bound() -> None:
    url = "https://x.example/" + "a" * (2048 - len("https://x.example/"))
    token = KEYS.sign_click("t" * 64, "c" * 128, "p" * 128, sent_at=2**40, link_index=9_998,
                            links_in_mail=9_999, url=url)
    assert len(token) <= MAX_TOKEN_LENGTH
    assert KEYS.verify(token).url == url
