"""Every file the code reads at run time ships in the wheel: the image installs the project
with a plain `pip install .`, which copies only modules and the package-data patterns."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "services", "projections")


def _globbed(inside: Path, glob: str) -> bool:
    """Like setuptools' glob: `*` never crosses a directory."""
    parts = glob.split("/")
    return len(parts) == len(inside.parts) and all(map(fnmatch, inside.parts, parts))


def _shipped(relative: Path, patterns: dict[str, list[str]]) -> bool:
    for package, globs in patterns.items():
        if package == "*":  # any package, the file in the package's own directory
            if any(_globbed(Path(relative.name), glob) for glob in globs):
                return True
            continue
        base = Path(*package.split("."))
        if base in relative.parents:
            inside = relative.relative_to(base)
            if any(_globbed(inside, glob) for glob in globs):
                return True
    return False


def test_every_data_file_of_the_packages_is_in_the_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]
    data_files = [
        path.relative_to(ROOT) for package in PACKAGES for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert data_files, "found no data files at all: the walk is wrong"
    assert [str(path) for path in data_files if not _shipped(path, patterns)] == []
