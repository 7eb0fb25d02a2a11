"""`python -m services.platform up|down|status`: the local platform for `make up/down/status`."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.settings import Settings
from services.platform.stack import Stack


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in {"up", "down", "status"}:
        print("usage: python -m services.platform up|down|status", file=sys.stderr)
        return 2
    stack = Stack(Path(Settings().state_dir))
    if argv[0] == "up":
        stack.up()
        return 0
    if argv[0] == "down":
        stack.down()
        return 0
    return 0 if stack.status() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
