"""What every CPU benchmark script does at its end: the result as JSON, on stdout and in its file."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    path.write_text(text + "\n")
    print(text)
