"""Relaxed cyclic garbage collection for a process that streams records (the sender, the
projector): `relaxed_gc()`, restored on exit.

Guarantee: only when and how often garbage *cycles* are collected changes; objects without
cycles are freed by reference counting exactly as before, and cycles are still collected, in
larger steps.

Why: such a process allocates a few container objects per record (the client's message, the
decoded event, rows, work items) and holds a batch or a few of them at a time, so with
CPython's default thresholds (700, 10, 10) a young collection ran every few hundred records
and a full one, which scans every object the imports left (pydantic's schemas and all), every
few batches. Measured: ~12% of the sender's main-thread samples (perf: gc_collect_main,
visit_decref, ...); ~0.6 s of the projector's ~2.1 s CPU on a cold drain of 200,000
deliveries (~1,000 young and 9 full collections; 1-2 with these settings). Nearly all of
those objects are freed by reference counting when their batch is done (no cycles), so
collections can be rare; the start-up objects are frozen (gc.freeze: never scanned again) so
a full collection scans only what the batches hold.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Young collection after this many net new container objects (a few batches' worth), then the
# older generations after 50 and 100 of those: memory stays bounded by the few cycles that
# wait for the next collection.
GC_THRESHOLDS = (50_000, 50, 100)


@contextmanager
def relaxed_gc() -> Iterator[None]:
    """GC_THRESHOLDS, with what exists on entry frozen; as before on exit."""
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
