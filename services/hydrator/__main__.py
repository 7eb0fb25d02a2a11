"""`python -m services.hydrator`: run the faust worker until SIGTERM (faust stops cleanly)."""

from __future__ import annotations

import os

import faust

from services.common.settings import Settings
from services.hydrator.app import create_app


def main() -> None:
    app = create_app(Settings())
    worker = faust.Worker(app, loglevel=os.environ.get("HYDRATOR_LOGLEVEL", "WARNING"), quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
