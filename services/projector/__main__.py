"""`python -m services.projector`: project the campaign topics into PostgreSQL until SIGTERM.

The service's one wiring point: settings from the environment, migrations, topics, then one
`Projector` per lane (`projections.lanes.LANES`: campaign.deliveries in a lane of its own, so
live progress is never queued behind a campaign start's burst of RecipientQueued; every other
topic in the other), each handed the Kafka feed and PostgreSQL store that
`projections.projector.lane_projectors` builds from these settings (the Projector itself reads
no environment and opens no connection of its own), each in its own thread with its own Kafka
consumer group. Exactly-once per lane, as `projections.projector` states. On SIGTERM or SIGINT
each lane's batch in flight commits (or rolls back) as one transaction, the consumers leave
their groups and the process exits 0; if one lane fails, the other stops too and the process
exits non-zero.

PROJECTOR_LANES=single runs one `Projector` over every topic instead (the design before the
lanes; for comparison and as a fallback): same positions, so the two modes can replace each
other across a restart.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from projections.engagement_projector import engagement_projector_for
from projections.lanes import ALL_TOPICS_LANE, LANES, LaneLoop, run_lanes
from projections.migrate import apply_migrations
from projections.projector import lane_projectors
from services.common.logs import configure_logging
from services.common.observability import standard_checks, start_observability
from services.common.settings import ProjectorSettings, load_or_exit
from services.common.topics import ensure_topics


def main() -> int:
    log = configure_logging("projector")
    settings = load_or_exit(ProjectorSettings, log)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    start_observability(settings, "projector", standard_checks(settings))
    applied = apply_migrations(settings.database_url)
    if applied:
        log.info("migrations applied", versions=applied)
    ensure_topics(settings)
    lanes = (ALL_TOPICS_LANE,) if settings.projector_lanes == "single" else LANES
    projectors: list[LaneLoop] = [*lane_projectors(settings, lanes=lanes, logger=log)]
    # One more lane: engagement, bounces and complaints (its own group and positions).
    projectors.append(engagement_projector_for(settings, logger=log.bind(lane="engagement")))
    run_lanes(projectors, stop, settings.heartbeat())
    return 0


if __name__ == "__main__":
    sys.exit(main())
