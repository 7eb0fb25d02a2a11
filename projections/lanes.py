"""The projector's lanes and the process that runs them.

The service runs one `Projector` per lane (`LANES`), each with its own consumer and Kafka
consumer group over its own topics: campaign.deliveries alone (small, latency-critical: live
progress), and everything else (including the hydrator's RecipientQueued bursts, tens of MB at
a campaign start). A delivery is thus never queued behind such a burst: it waits at most for
the other lane's transaction in flight on the same campaign row (see batch_writer: every
transaction locks its campaign rows first, in campaign id order). The read models do not depend
on the order the lanes commit in (a recipient's status only climbs; read_models). Both lanes
store their positions under one name (`POSITIONS_NAME`, what `campaignctl projections rebuild`
compares and swaps): positions are per topic-partition and the lanes' topics are disjoint, so
they never touch each other's rows, while two instances of one lane still fence each other.

Guarantee: `run_lanes` stops every lane when one fails, and raises that lane's error once all
have closed (a process with one dead lane would look alive while half the topics go
unprojected).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from projections.batching import BATCH_MAX_RECORDS, MAIN_LANE_BATCH_MAX_RECORDS, lanes_alive
from services.common.gc_tuning import relaxed_gc
from services.common.heartbeat import Heartbeat
from services.common.topics import CONTACTS, DELIVERIES, EVENTS, RECIPIENTS, SEGMENTS, TopicSpec

# segments.events: only for the command gateway's outcomes of segment commands.
PROJECTED_TOPICS = (EVENTS, RECIPIENTS, DELIVERIES, CONTACTS, SEGMENTS)
# Where every lane stores its positions (projector_positions.consumer_group, under the topic
# prefix): one name for the whole projection, whatever lane or version wrote a partition.
POSITIONS_NAME = "projector"
# How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms): the
# writer thread needs the GIL for a moment after each PostgreSQL round trip and COPY flush,
# and otherwise waits out the interval while the driving thread decodes.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


@dataclass(frozen=True)
class Lane:
    """Some of the projected topics, consumed by one `Projector` with its own consumer group."""

    group: str  # Kafka consumer group name (under the topic prefix)
    topics: tuple[TopicSpec, ...]
    batch_size: int = BATCH_MAX_RECORDS  # records per transaction at most


# Deliveries first: their lane is the latency-critical one.
DELIVERY_LANE = Lane("projector-deliveries", (DELIVERIES,))
MAIN_LANE = Lane("projector", tuple(t for t in PROJECTED_TOPICS if t is not DELIVERIES),
                 batch_size=MAIN_LANE_BATCH_MAX_RECORDS)
LANES = (DELIVERY_LANE, MAIN_LANE)
# One lane over every topic (PROJECTOR_LANES=single; a rebuild): the same positions as LANES.
ALL_TOPICS_LANE = Lane(POSITIONS_NAME, PROJECTED_TOPICS)


class LaneLoop(Protocol):
    """What `run_lanes` needs of a projector."""

    group: str
    looped_at: float

    def run(self, stop_event: threading.Event) -> None: ...


@contextmanager
def projecting_process() -> Iterator[None]:
    """Process-wide settings for a process whose main work is projecting (`run_lanes`, the
    projection bench), restored on exit: the short GIL switch interval
    (GIL_SWITCH_INTERVAL_SECONDS) and relaxed garbage collection (services.common.gc_tuning:
    GC_THRESHOLDS, what exists on entry frozen)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, GIL_SWITCH_INTERVAL_SECONDS))
    try:
        with relaxed_gc():
            yield
    finally:
        sys.setswitchinterval(interval)  # as it was, for whatever the process does next


def run_lanes(projectors: Sequence[LaneLoop], stop: threading.Event,
              heartbeat: Heartbeat | None = None) -> None:
    """Run each projector in a thread of its own until `stop` is set, in a
    `projecting_process` (short GIL switch interval, relaxed garbage collection).

    A lane that fails sets `stop` for the others and its error is raised once all have closed.
    `heartbeat` beats while every lane's loop comes round.
    """
    errors: list[BaseException] = []

    def drive(projector: LaneLoop) -> None:
        try:
            projector.run(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=drive, args=(p,), name=f"lane-{p.group}", daemon=True)
               for p in projectors]
    with projecting_process():
        for thread in threads:
            thread.start()
        for thread in threads:
            # Joined in slices: the calling (main) thread stays free to run signal handlers.
            while thread.is_alive():
                thread.join(0.5)
                # The process is alive while every lane's loop is: one stuck lane is a hang.
                if heartbeat and lanes_alive(time.monotonic(), [p.looped_at for p in projectors]):
                    heartbeat.beat()
    if errors:
        raise errors[0]
