"""Export JSON Schema for every registered wire type, for producers not written in Python.

`python -m schemas.export` (or `make schemas`) writes schemas/json/<Type>.v<N>.json and
envelope.json; a test fails when the committed files differ from what the code says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.envelope import Envelope
from schemas.registry import registered

OUT = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    """File name -> JSON text, for every schema the code defines."""
    files = {"envelope.json": Envelope.model_json_schema()}
    for name, (version, model) in sorted(registered().items()):
        schema = model.model_json_schema()
        schema["x-wire-type"] = name
        schema["x-wire-version"] = version
        files[f"{name}.v{version}.json"] = schema
    return {name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in files.items()}


def write(out: Path = OUT) -> list[str]:
    out.mkdir(exist_ok=True)
    files = rendered()
    for stale in out.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (out / name).write_text(text)
    return sorted(files)


if __name__ == "__main__":
    names = write()
    print(f"wrote {len(names)} schemas to {OUT}", file=sys.stderr)
