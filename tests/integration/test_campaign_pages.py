"""GET /campaigns with filters and keyset paging against the real read models (rows written
directly, as tests/integration/test_api.py does), and its 422s for bad values."""

from __future__ import annotations

import base64
import json

import pytest

from services.api.app import MAX_CAMPAIGN_PAGE
from tests.integration.test_api import World, auth, client, world  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def pages(client, key: str, **params) -> list[list[dict]]:  # noqa: F811
    found, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get("/campaigns", params=query, headers=auth(key))
        assert response.status_code == 200, response.text
        body = response.json()
        found.append(body["campaigns"])
        cursor = body["next_cursor"]
        if cursor is None:
            return found


def test_campaigns_filtered_and_paged_newest_first(client, world: World):  # noqa: F811
    ids = []
    for i in range(7):
        ids.append(world.campaign(
            world.a, campaign_id=f"cmp-{i}-{world.a}", name=f"Spring {i}" if i % 2 else f"Autumn {i}",
            status="draft" if i < 4 else "sending",
            created_at=None if i == 6 else f"2030-01-0{1 + i // 2}T10:00:00+00:00"))
    world.campaign(world.b, name="Spring of B", status="draft")
    newest_first = [ids[4], ids[5], ids[2], ids[3], ids[0], ids[1], ids[6]]  # ties: by id
    got = pages(client, world.key_a, limit=3)
    assert [len(p) for p in got] == [3, 3, 1]
    assert [c["campaign_id"] for p in got for c in p] == newest_first
    drafts = pages(client, world.key_a, status="draft", limit=2)
    assert [c["campaign_id"] for p in drafts for c in p] == [ids[2], ids[3], ids[0], ids[1]]
    spring = pages(client, world.key_a, name="SPRING", limit=1)
    assert [c["name"] for p in spring for c in p] == ["Spring 5", "Spring 3", "Spring 1"]
    both = pages(client, world.key_a, name="spring", status="draft")
    assert [c["campaign_id"] for p in both for c in p] == [ids[3], ids[1]]
    # Tenant B sees only its own.
    assert [c["name"] for p in pages(client, world.key_b) for c in p] == ["Spring of B"]
    assert pages(client, world.key_b, name="Autumn") == [[]]


@pytest.mark.parametrize(("params", "where"), [
    ({"status": "running"}, "status"),
    ({"limit": 0}, "limit"),
    ({"limit": MAX_CAMPAIGN_PAGE + 1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"name": ""}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"cursor": "not a cursor"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b'{"at": null, "id": "bad id!", "f": [null, null]}')
      .decode()}, "cursor"),
    ({"cursor": "x" * 2000}, "cursor"),
])
def test_bad_filters_and_cursors_are_422_with_the_reason(client, world, params, where):  # noqa: F811
    response = client.get("/campaigns", params=params, headers=auth(world.key_a))
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["query", where]]


def test_a_cursor_only_serves_the_filters_it_was_made_for(client, world):  # noqa: F811
    for i in range(3):
        world.campaign(world.a, name=f"n{i}", status="draft")
    first = client.get("/campaigns", params={"status": "draft", "limit": 1},
                       headers=auth(world.key_a)).json()
    cursor = first["next_cursor"]
    made = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    assert made["f"] == ["draft", None]
    other = client.get("/campaigns", params={"status": "sending", "cursor": cursor},
                       headers=auth(world.key_a))
    assert other.status_code == 422
    assert "other filters" in other.json()["detail"][0]["msg"]
    # Another tenant's key with the cursor gets its own campaigns only (none are drafts).
    foreign = client.get("/campaigns", params={"status": "draft", "cursor": cursor},
                         headers=auth(world.key_b))
    assert foreign.json()["campaigns"] == []
