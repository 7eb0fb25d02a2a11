"""The projector's batching and retry rules as pure functions: plain values in, a decision out.

`projections.projector` only carries these decisions out (consumes more, hands a batch over,
seeks, pauses, reloads, re-creates its consumer); each is unit-tested on plain values.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from services.common.kafka import PartitionKey

# Records per transaction: bounds memory, the row locks one transaction holds and the work a
# failed commit has to redo; large enough that per-batch round trips stay negligible. Only a
# backlog fills a batch: live traffic comes in whatever one poll holds.
BATCH_MAX_RECORDS = 10_000
# The main lane's batches are smaller: each of its transactions holds the campaign row lock a
# delivery transaction of the same campaign waits for (batch_writer's lock order), and at a
# campaign's start it projects the hydrator's whole burst of RecipientQueued.
MAIN_LANE_BATCH_MAX_RECORDS = 2_000
# Live traffic (a steady trickle): a batch that is not full is handed to the writer no sooner
# than this after the previous one, and gathers what arrives meanwhile (fewer, larger
# transactions); never while a backlog drains, never for the first record after a pause.
LIVE_LINGER_SECONDS = 0.1
# consume() builds all the messages it returns in one C call that holds the GIL: taken this
# many at a time, the writer thread gets the GIL between calls.
CONSUME_CHUNK = 2000
# While a batch is in flight and no record comes, how often the driving thread looks whether
# the batch is done (its positions are then taken at once, not after an idle poll).
IN_FLIGHT_POLL_SECONDS = 0.005
# Pause after a database failure before consuming again: a restarting PostgreSQL is not
# hammered, and a failing batch is not retried in a hot loop.
DB_RETRY_BACKOFF_SECONDS = 1.0
# A member waiting this long for an assignment after losing its partitions is re-created: a
# healthy group answers within a session timeout or two.
STUCK_MEMBER_SECONDS = 90.0
# A lane whose loop has not come round for this long is stuck: the process stops beating.
LANE_SILENT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Pace:
    """When the last batch was handed to the writer, and whether it was full."""

    handed_over_at: float = float("-inf")
    last_full: bool = True


def linger_left(gathered: int, batch_size: int, pace: Pace, linger: float, now: float) -> float:
    """Seconds to go on gathering records before handing the batch over (0: hand it over).

    Only live traffic lingers: a full batch, or one after a full one (a backlog and its last
    batch), goes at once; otherwise until `linger` after the previous hand-over."""
    if pace.last_full or gathered >= batch_size:
        return 0.0
    return max(0.0, pace.handed_over_at + linger - now)


def next_chunk(taken: int, wanted: int) -> int:
    """How many already-fetched records to ask for next (0: the batch has enough)."""
    return max(0, min(CONSUME_CHUNK, wanted - taken))


def in_flight_poll(left: float) -> float:
    """How long one poll may wait for a first record while a batch is in flight."""
    return max(0.0, min(IN_FLIGHT_POLL_SECONDS, left))


def stop_waiting_for_first(got_record: bool, batch_done: bool, left: float) -> bool:
    """Whether to stop polling for the first record of the next batch: one came, the batch in
    flight is done (take its outcome now), or the poll timeout is (nearly) used up."""
    return got_record or batch_done or left <= IN_FLIGHT_POLL_SECONDS


class Failure(enum.Enum):
    """Why a batch did not commit, in the projector's own words."""

    POSITIONS_MOVED = "positions moved"  # another instance committed these partitions
    ROW_CONFLICT = "row conflict"  # a deadlock victim, a row inserted meanwhile
    DATABASE = "database"  # anything else PostgreSQL answered (or a lost connection)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What the loop does after a failed batch: rewind the consumer to the stored positions
    (reloaded from PostgreSQL first if `reload`), then pause `pause_seconds`."""

    reload: bool
    pause_seconds: float
    retried_at_once: bool  # this failure is being retried without a pause


def recover(failure: Failure, *, retried_at_once: bool) -> Recovery:
    """A moved position is the truth: reload it, no pause. A row conflict means another
    transaction got there first and has ended: retry at once, once; a second failure in a row,
    and any other failure, waits out DB_RETRY_BACKOFF_SECONDS."""
    if failure is Failure.POSITIONS_MOVED:
        return Recovery(reload=True, pause_seconds=0.0, retried_at_once=retried_at_once)
    at_once = failure is Failure.ROW_CONFLICT and not retried_at_once
    return Recovery(reload=False, pause_seconds=0.0 if at_once else DB_RETRY_BACKOFF_SECONDS,
                    retried_at_once=at_once)


def should_renew(waited: float | None, limit: float = STUCK_MEMBER_SECONDS) -> bool:
    """Whether a member that has waited `waited` seconds for an assignment (None: joined)
    should re-create its consumer."""
    return waited is not None and waited > limit


def assignment_complete(stored: Mapping[PartitionKey, int | None],
                        assigned: Collection[PartitionKey]) -> bool:
    """Whether partitions are assigned and each has its stored position loaded."""
    return bool(assigned) and len(assigned) == len(stored)


def at_end(stored: Mapping[PartitionKey, int | None], consumer_at: Mapping[PartitionKey, int],
           ends: Mapping[PartitionKey, int]) -> bool:
    """Whether every partition is projected up to its end offset.

    A transaction marker at the end of a partition is never delivered as a record, so the
    consumer's own position may be past the last stored offset: either one reaching the end
    counts."""
    return all(max(stored.get(key) or 0, consumer_at.get(key, -1)) >= end
               for key, end in ends.items())


def lanes_alive(now: float, looped_at: Collection[float],
                silent: float = LANE_SILENT_SECONDS) -> bool:
    """Whether every lane's loop came round within `silent` seconds (the process beats)."""
    return all(now - at < silent for at in looped_at)
