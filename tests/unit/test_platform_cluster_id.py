"""KRaft cluster ids: valid for StorageTool, and never mistaken for an option."""

from __future__ import annotations

import base64
import uuid

import pytest

from services.platform import kafka
from services.platform.kafka import new_cluster_id


def test_an_id_is_sixteen_bytes_of_url_safe_base64() -> None:
    cluster_id = new_cluster_id()
    assert len(cluster_id) == 22
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_an_id_that_would_start_with_a_dash_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0xf8 encodes to "-" as the first URL-safe base64 character.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(draws))
    assert base64.urlsafe_b64encode(b"\xf8" + bytes(15)).startswith(b"-")
    assert new_cluster_id() == base64.urlsafe_b64encode(b"\x01" * 16).decode().rstrip("=")
