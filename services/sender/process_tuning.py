"""Process-wide settings of a sender process (`python -m services.sender`): the cyclic garbage
collector relaxed, restored on exit.

Guarantee: only when and how often garbage *cycles* are collected changes; objects without
cycles are freed by reference counting exactly as before, and cycles are still collected, in
larger steps.

Why: a sender allocates a dozen container objects per mail (the decoded recipient and its
envelope, the work item, claims and outcomes, the MIME parts) and holds a few batches of them
at a time, so with the default thresholds (700, 10, 10) a young collection ran every few
dozen mails and a full one, which scans every object the imports left (pydantic's schemas and
all), every few hundred: `perf` put ~12% of the main thread's samples in the collector
(gc_collect_main, visit_decref, visit_reachable, *_traverse). Nearly all of those objects are
freed by reference counting when their chunk is published (no cycles), so collections can be
rare; the start-up objects are frozen (gc.freeze: never scanned again) so a full collection
scans only what the batches hold. The projector does the same (projections/projector.py).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Young collection after this many net new container objects (a few batches' worth: a
# sender holds at most a few batches of recipients, services/sender/pipeline.py), then the
# older generations after 50 and 100 of those: memory stays bounded by the few cycles that
# wait for the next collection.
GC_THRESHOLDS = (50_000, 50, 100)


@contextmanager
def sending_process() -> Iterator[None]:
    """Relaxed collection (GC_THRESHOLDS) with what exists on entry frozen; as before on exit."""
    thresholds = gc.get_threshold()
    froze = gc.get_freeze_count() == 0  # else someone else froze: leave theirs as it is
    if froze:
        gc.collect()  # what is garbage now is not kept forever by the freeze
        gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if froze:
            gc.unfreeze()
