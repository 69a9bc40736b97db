"""The ingested files' format: one JSON object per line (dialogues, targets)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """Every object of an ingested JSONL file; a missing file names the command that makes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `federimed ingest` for this hospital first")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
