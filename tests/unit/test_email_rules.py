"""The address rules of schemas.base: what a new address becomes (`normalise_email`), what
events read back (`Email`), and who an address belongs to (`email_identity`, contact ids)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from schemas.base import Email, InvalidEmail, _validated, email_identity, normalise_email
from schemas.contacts import _CONTACT_NAMESPACE, contact_id_for
from services.cli.contact_records import ContactIds
from services.sender.mime import OutgoingMail


@pytest.mark.parametrize(("raw", "stored"), [
    ("ann@bücher.example", "ann@xn--bcher-kva.example"),
    ("ann@XN--BCHER-KVA.example", "ann@xn--bcher-kva.example"),
    ("ann@münchen.de", "ann@xn--mnchen-3ya.de"),
    # IDNA 2008, not 2003: ß is its own letter, not mapped to "ss" (that would be fass.de).
    ("info@faß.de", "info@xn--fa-hia.de"),
    ("jörg@example.de", "jörg@example.de"),
    ("Jo\u0308rg@example.de", "J\u00f6rg@example.de"),  # NFC: one code point, as typed elsewhere
    ("  Jane.Doe@Example.COM ", "Jane.Doe@example.com"),
    ("o'neil+tag@example.org", "o'neil+tag@example.org"),
])
def test_new_addresses_keep_the_local_part_and_carry_the_domain_in_ascii(raw, stored):
    assert normalise_email(raw) == stored
    # What is stored is what events read back, unchanged.
    assert TypeAdapter(Email).validate_python(stored) == stored


def test_an_idn_domain_goes_on_the_wire_as_punycode_without_smtputf8():
    mail = OutgoingMail("<m@example.com>", "news@example.com", normalise_email("ann@bücher.example"), b"")
    assert mail.recipient == "ann@xn--bcher-kva.example" and not mail.needs_smtputf8
    assert OutgoingMail("<m@example.com>", "news@example.com", normalise_email("jörg@example.de"),
                        b"").needs_smtputf8


@pytest.mark.parametrize(("raw", "reason"), [
    ("ann@☃.example", "U+2603"),
    ("ann@xn--zz.example", "not valid IDNA"),
    ("ann@bücher", "should have a period"),
    ("Ann <ann@example.com>", "display name"),
    ('"a b"@example.com', "Quoting"),
    ("a@[127.0.0.1]", "bracketed IP"),
    ("x" * 65 + "@example.com", "too long before the @-sign"),
    ("a..b@example.com", "two periods"),
    ("no-at", "must have an @-sign"),
    ("ann@b\udcfcr.example", "not valid UTF-8"),  # a bad byte of a CSV file
])
def test_refusals_say_why(raw, reason):
    with pytest.raises(InvalidEmail, match="not a valid e-mail address") as refused:
        normalise_email(raw)
    assert reason in str(refused.value)


_local = st.text(alphabet="abcXYZ019.+-_'", min_size=1, max_size=70)
_domain = st.sampled_from(["example.com", "Example.COM", "b.io", "-x.com", "a.b", "xn--bcher-kva.example",
                           "xn--zz.example", "a_b.com", "e.c0m", "x" * 64 + ".com"])


@settings(max_examples=400, deadline=None)
@given(_local, _domain)
def test_the_ascii_fast_path_answers_as_the_library(local, domain):
    address = f"{local}@{domain}"
    try:
        slow: str | None = _validated(address, address)
    except InvalidEmail:
        slow = None
    try:
        fast: str | None = normalise_email(address)
    except InvalidEmail:
        fast = None
    assert fast == slow


def test_identity_is_the_whole_address_regardless_of_case():
    assert email_identity(" Ann@Example.COM") == email_identity("ann@example.com") == "ann@example.com"
    assert email_identity("ann+x@example.com") != email_identity("ann@example.com")
    # Lower-casing, not case folding: straße and strasse are different mailboxes.
    assert email_identity("straße@example.de") != email_identity("strasse@example.de")
    assert contact_id_for("acme", normalise_email(" Ann@Example.COM")) == contact_id_for("acme", "ann@example.com")
    assert contact_id_for("acme", "ann+x@example.com") != contact_id_for("acme", "ann@example.com")
    assert contact_id_for("acme", "ann@bücher.example") == contact_id_for("acme", "ANN@xn--bcher-kva.example")


def _old_contact_id(tenant: str, address: str) -> str:
    """Contact ids before the identity rule: the address with its domain lower-cased only."""
    return str(uuid.uuid5(_CONTACT_NAMESPACE, f"{tenant}\x00{address}"))


@pytest.mark.parametrize("address", ["ann@example.com", "o'neil+tag@example.org", "jörg@example.de",
                                     "a.b-c@sub.example.co.uk"])
def test_ids_of_lower_case_addresses_are_unchanged_by_the_identity_rule(address):
    # Existing contacts of such addresses keep their id: re-importing them splits nothing.
    assert contact_id_for("acme", address) == _old_contact_id("acme", address)
    assert ContactIds("acme").of(address) == _old_contact_id("acme", address)


def test_a_mixed_case_local_part_had_an_id_of_its_own():
    # These are the contacts `identity_merge` lands rows on and merges (tests there).
    assert contact_id_for("acme", "Ann@example.com") != _old_contact_id("acme", "Ann@example.com")
