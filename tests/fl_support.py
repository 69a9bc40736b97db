"""Tiny ingested hospital directories (contract format) and settings for the Flower tests."""

from __future__ import annotations

import json
from pathlib import Path

from federimed.config import RunSettings, TrainSettings

SYSTEM = "You are a clinical decision-support assistant. Suggest what to start for this case."
CASES = [
    ("essential hypertension", "lisinopril 10 MG Oral Tablet"),
    ("type 2 diabetes mellitus", "metformin hydrochloride 500 MG Oral Tablet"),
    ("hyperlipidemia", "simvastatin 20 MG Oral Tablet"),
    ("acute bacterial sinusitis", "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet"),
    ("streptococcal sore throat", "penicillin V potassium 250 MG Oral Tablet"),
    ("chronic obstructive bronchitis", "fluticasone / salmeterol inhaler; albuterol inhaler"),
]


def dialogue(hospital: str, number: int) -> dict:
    """One synthetic case dialogue in the ingest contract's shape."""
    condition, drug = CASES[(number + len(hospital)) % len(CASES)]
    age = 40 + (number * 7) % 45
    return {
        "id": f"{hospital}-case-{number:03d}",
        "patient": f"{hospital}-patient-{number:03d}",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Age {age}. New diagnosis: {condition}. Active problems: none. What to start?"},
            {"role": "assistant", "content": f"Started: {drug}."},
        ],
    }


def make_hospital(root: Path, name: str, train: int, heldout: int = 2) -> Path:
    """Write `root/name/` with manifest.json, train.jsonl and heldout.jsonl of synthetic dialogues."""
    path = root / name
    path.mkdir(parents=True)
    rows = [dialogue(name, i) for i in range(train + heldout)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:train]))
    (path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[train:]))
    manifest = {
        "hospital": name,
        "sources": [{"path": "synthetic", "format": "test", "version": "0"}],
        "counts": {"train_cases": train, "heldout_cases": heldout},
        "split": {"seed": 0, "heldout_share": 0.2, "train_patients": train, "heldout_patients": heldout},
        "skipped": [],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def tiny_settings(rounds: int = 2, steps: int = 2) -> RunSettings:
    """Settings small enough for CPU tests: 2 steps of 2 dialogues of at most 128 tokens per round."""
    return RunSettings(
        rounds=rounds, train=TrainSettings(local_steps=steps, batch_size=2, seq_len=128), eval_batch_size=4
    )
