"""The sender's direct EmailSent writer makes its event ids as uuid.uuid4() does: version 4,
RFC 4122 variant, canonical lower-case text, all distinct."""

from __future__ import annotations

import uuid

from services.sender.sent_event import _uuid4_text


def test_ids_are_canonical_random_uuids() -> None:
    ids = [_uuid4_text() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 4 and value.variant == uuid.RFC_4122
        assert str(value) == text  # the same spelling str(uuid.uuid4()) has


def test_every_free_bit_varies() -> None:
    # 122 random bits: over many ids each one is seen both set and clear; the 6 fixed
    # version and variant bits never vary.
    values = [uuid.UUID(_uuid4_text()).int for _ in range(2_000)]
    ones = 0
    zeros = 0
    for v in values:
        ones |= v
        zeros |= ~v & ((1 << 128) - 1)
    varying = ones & zeros
    assert bin(varying).count("1") == 122


def test_a_recipients_terminal_event_id_is_the_same_for_every_copy() -> None:
    from services.sender.delivery import delivery_event_id

    terminal = delivery_event_id("cmp-1", "c-1")
    assert terminal == delivery_event_id("cmp-1", "c-1")  # a re-published copy
    assert uuid.UUID(terminal).version == 5
    # Another recipient, another campaign, and each attempt's deferral get their own ids.
    others = {delivery_event_id("cmp-1", "c-2"), delivery_event_id("cmp-2", "c-1"),
              delivery_event_id("cmp-1", "c-1", 1), delivery_event_id("cmp-1", "c-1", 2)}
    assert terminal not in others and len(others) == 4
    assert delivery_event_id("cmp-1", "c-1", 1) == delivery_event_id("cmp-1", "c-1", 1)
