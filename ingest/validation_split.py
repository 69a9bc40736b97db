"""A validation federation carved from the training split only, to choose a training recipe on.

Each hospital's training patients are split again, by a seeded hash of their pseudonym: about `share` of
them become the validation hospital's held-out set, the rest its training set. Held-out patients of the
real split are never read, so no recipe is tuned on the cases models are finally scored on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ingest.jsonl import read_jsonl, write_jsonl

SPLITS = ("train.jsonl", "targets.train.jsonl")
"""The files of a training split that a validation split divides."""


def validation_patients(patients: set[str], share: float, seed: int) -> set[str]:
    """The `share` of `patients` (at least one, never all but when there is one) that validate."""
    if not 0 < share < 1:
        raise ValueError(f"the validation share must be between 0 and 1, not {share}")
    ranked = sorted(patients, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    count = min(max(1, round(share * len(ranked))), max(1, len(ranked) - 1))
    return set(ranked[:count])


def carve_validation(data_dir: Path, out_dir: Path, share: float = 0.2, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write one validation hospital per ingested hospital of `data_dir` into `out_dir`; counts per hospital."""
    counts = {}
    hospitals = sorted(p for p in Path(data_dir).iterdir() if (p / "train.jsonl").is_file())
    if not hospitals:
        raise FileNotFoundError(f"no ingested hospital (with a train.jsonl) under {data_dir}")
    for hospital in hospitals:
        rows = {name: read_jsonl(hospital / name) for name in SPLITS}
        held = validation_patients({row["patient"] for row in rows["train.jsonl"]}, share, seed)
        target = Path(out_dir) / hospital.name
        target.mkdir(parents=True, exist_ok=True)
        for name, lines in rows.items():
            kind = name.removesuffix(".jsonl").replace("train", "{}")
            for split, keep in (("train", False), ("heldout", True)):
                chosen = [row for row in lines if (row["patient"] in held) == keep]
                write_jsonl(target / f"{kind.format(split)}.jsonl", chosen)
        manifest = json.loads((hospital / "manifest.json").read_text())
        manifest["validation"] = {"of": str(hospital), "share": share, "seed": seed,
                                  "train_patients": len({r["patient"] for r in rows["train.jsonl"]}) - len(held),
                                  "validation_patients": len(held)}
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        counts[hospital.name] = {"train": sum(1 for r in rows["train.jsonl"] if r["patient"] not in held),
                                 "validation": sum(1 for r in rows["train.jsonl"] if r["patient"] in held)}
    return counts
