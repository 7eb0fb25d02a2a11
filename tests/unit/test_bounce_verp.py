"""VERP tokens: round trip, case folding, bounds, key rotation, tampering."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.bounces.verp import (
    CampaignRefs,
    VerpClaim,
    VerpKeys,
    VerpRefusal,
    VerpTooLong,
    read_address,
    verp_address,
)

DOMAIN = "bounces.example.com"
KEYS = VerpKeys.parse("k:current-secret,j:previous-secret")

tenants = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
entities = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
contacts = st.one_of(st.uuids().map(str), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,15}\Z"))


@settings(max_examples=300, deadline=None)
@given(tenant=tenants, campaign=entities, contact=contacts, upper=st.booleans())
def test_every_address_reads_back_whatever_the_case(tenant, campaign, contact, upper):
    address = verp_address(KEYS, DOMAIN, tenant, campaign, contact)
    local = address.split("@")[0]
    assert len(local.encode()) <= 64
    assert set(local) <= set(string.ascii_lowercase + "234567+")
    seen = address.upper() if upper else address
    claim = read_address(seen, DOMAIN, KEYS, CampaignRefs([(tenant, campaign)]))
    assert claim == VerpClaim(tenant, campaign, contact)


def test_short_ids_need_no_directory_and_long_ones_go_by_reference():
    short = verp_address(KEYS, DOMAIN, "acme", "c1", "p1")
    assert short.startswith("bounces+ak")
    assert read_address(short, DOMAIN, KEYS) == VerpClaim("acme", "c1", "p1")
    contact = str(uuid.uuid4())
    long = verp_address(KEYS, DOMAIN, "acme", "cmp-3f2a9c1b7d4e", contact)
    assert long.startswith("bounces+rk")
    assert read_address(long, DOMAIN, KEYS) == VerpRefusal("campaign reference needs a directory")
    assert read_address(long, DOMAIN, KEYS, CampaignRefs()) == VerpRefusal("unknown campaign reference")
    found = read_address(long, DOMAIN, KEYS, CampaignRefs([("acme", "cmp-3f2a9c1b7d4e")]))
    assert found == VerpClaim("acme", "cmp-3f2a9c1b7d4e", contact)


def test_ids_that_fit_no_form_are_refused_clearly():
    with pytest.raises(VerpTooLong, match="does not fit"):
        verp_address(KEYS, DOMAIN, "acme", "c" * 40, "a-contact-id-of-many-characters")
    with pytest.raises(ValueError, match="valid ids"):
        verp_address(KEYS, DOMAIN, "acme", "c1", "no spaces")


def test_rotation_old_keys_verify_new_ones_sign_unknown_ones_refuse():
    old = VerpKeys.parse("j:previous-secret")
    address = verp_address(old, DOMAIN, "acme", "c1", "p1")
    assert read_address(address, DOMAIN, KEYS) == VerpClaim("acme", "c1", "p1")
    assert verp_address(KEYS, DOMAIN, "acme", "c1", "p1").startswith("bounces+ak")
    assert read_address(address, DOMAIN, VerpKeys.parse("k:current-secret")) == VerpRefusal("unknown key id 'j'")
    assert read_address(address, DOMAIN, VerpKeys.parse("j:another-secret")) == VerpRefusal("bad signature")


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=200), char=st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"))
def test_a_changed_character_never_gives_another_claim(position, char):
    contact = "7d3c6f1e-2b4a-4c8d-9e0f-1a2b3c4d5e6f"
    address = verp_address(KEYS, DOMAIN, "acme", "cmp-1", contact)
    local, domain = address.split("@")
    index = len("bounces+") + position % (len(local) - len("bounces+"))
    changed = local[:index] + char + local[index + 1:]
    claim = read_address(f"{changed}@{domain}", DOMAIN, KEYS, CampaignRefs([("acme", "cmp-1")]))
    if changed == local:
        assert claim == VerpClaim("acme", "cmp-1", contact)
    else:
        assert isinstance(claim, VerpRefusal)


@given(st.text(max_size=120))
def test_any_text_is_a_refusal_or_a_claim_never_an_error(text):
    result = read_address(text, DOMAIN, KEYS, CampaignRefs())
    assert isinstance(result, VerpRefusal | VerpClaim)
    assert isinstance(read_address(f"bounces+{text}@{DOMAIN}", DOMAIN, KEYS, CampaignRefs()), VerpRefusal)


@pytest.mark.parametrize("address, reason", [
    ("ann@example.net", "not a VERP address of the bounce domain"),
    (f"bounces+ak@{DOMAIN}.evil.example", "not a VERP address of the bounce domain"),
    (f"other+akaaaa@{DOMAIN}", "not a VERP address of the bounce domain"),
    (f"bounces+fbl@{DOMAIN}", "malformed token"),
    (f"bounces+xkaaaaaaaaaaaaaaaaaaaa@{DOMAIN}", "malformed token"),
])
def test_refusals_say_why(address, reason):
    assert read_address(address, DOMAIN, KEYS) == VerpRefusal(reason)


@pytest.mark.parametrize("text", ["", "k", "kk:secret", "1:secret", "k:", "k:a,k:b"])
def test_bad_key_lists_are_refused(text):
    with pytest.raises(ValueError):
        VerpKeys.parse(text)
