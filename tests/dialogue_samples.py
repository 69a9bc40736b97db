"""Small synthetic training dialogues (diagnosis → started drug) for the model, training and checkpoint tests."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "You are a clinical decision-support assistant. Name the treatment to start."
TREATMENTS = {
    "essential hypertension": "lisinopril 10 MG Oral Tablet",
    "type 2 diabetes mellitus": "metformin hydrochloride 500 MG Oral Tablet",
    "hyperlipidemia": "simvastatin 20 MG Oral Tablet",
    "streptococcal sore throat": "penicillin V potassium 500 MG Oral Tablet",
}


def dialogue(number: int, condition: str, *, case_lines: int = 1, patient: str | None = None) -> dict:
    """One contract-shaped dialogue; `case_lines` pads the case text to make it long."""
    age = 30 + (number * 7) % 55
    history = " ".join(f"Visit {i}: blood pressure {120 + i} over {80 + i}, stable." for i in range(case_lines - 1))
    return {
        "id": f"case-{number:04d}",
        "patient": patient or f"patient-{number:04d}",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{history} A {age}-year-old patient. New diagnosis: {condition}. "
                                        "What was started?".strip()},
            {"role": "assistant", "content": f"Started {TREATMENTS[condition]}."},
        ],
    }


def dialogues(count: int, conditions: list[str] | None = None, start: int = 0) -> list[dict]:
    """`count` dialogues cycling through `conditions` (default: all four)."""
    conditions = conditions or list(TREATMENTS)
    return [dialogue(start + i, conditions[i % len(conditions)]) for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
