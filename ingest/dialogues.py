"""Case snapshots → short chat dialogues (system / user / assistant) for fine-tuning and inference.

The model is small (135M parameters, 256-token training window), so the text is compact and
regular: one fact per line in the question, one fixed line per kind of treatment in the answer.
"""

from __future__ import annotations

from ingest.cases import Case, Snapshot, clean_display

SYSTEM_PROMPT = (
    "You are a clinical decision-support assistant. "
    "Name the medications, procedures and care plan to start for this de-identified case."
)
QUESTION = "What treatment should be started?"
MAX_DRUGS = 4  # ingredients on the answer's medication line
MAX_ITEMS = 3  # procedures and care-plan activities on their lines
MAX_USER_CHARS = 560  # ~150 SmolLM2 tokens: with the answer, a dialogue stays inside 256 tokens
NONE = "none"
MEDICATION_PREFIX = "Start medications: "
"""How the answer's first line begins: the drugs started follow it."""


def _join(items: list[str]) -> str:
    return "; ".join(items) if items else NONE


def snapshot_text(snapshot: Snapshot, question: bool = True) -> str:
    """The user turn: the de-identified case in compact structured lines, at most ``MAX_USER_CHARS``.

    When the case is too long, the longest of the background lists (conditions, medications,
    allergies) loses its last (oldest or least relevant) item until the text fits.
    """
    lists = [list(snapshot.active_conditions), list(snapshot.current_medications), list(snapshot.allergies)]
    text = _render(snapshot, *lists, question)
    while len(text) > MAX_USER_CHARS and any(lists):
        max(lists, key=lambda items: len("; ".join(items))).pop()
        text = _render(snapshot, *lists, question)
    return text


def _render(snapshot: Snapshot, conditions: list[str], medications: list[str], allergies: list[str],
            question: bool) -> str:
    who = f"{snapshot.age}-year-old {snapshot.sex}"
    lines = [f"Patient: {who}"]
    if snapshot.new_diagnoses:
        lines.append(f"New diagnosis: {_join(snapshot.new_diagnoses)}")
    lines += [
        f"Active conditions: {_join(conditions)}",
        f"Current medications: {', '.join(medications) or NONE}",
        f"Allergies: {_join(allergies)}",
        f"Recent findings: {_join(snapshot.findings)}",
    ]
    if question:
        lines.append(f"Question: {QUESTION}")
    return "\n".join(lines)


def answer_text(case: Case) -> str:
    """The assistant turn: what was actually started, one line per kind, "none" where empty."""
    ingredients = [name for drug in case.drugs for name in drug.ingredients]
    drugs = list(dict.fromkeys(ingredients))[:MAX_DRUGS]
    procedures = [clean_display(p.display) for p in case.procedures][:MAX_ITEMS]
    plans = [clean_display(p.display) for p in case.careplans][:2]
    activities = [clean_display(a.display) for a in case.careplan_activities][:MAX_ITEMS]
    plan = _join(plans) + (f" ({', '.join(activities)})" if plans and activities else "")
    return "\n".join(
        [
            f"{MEDICATION_PREFIX}{', '.join(drugs) or NONE}.",
            f"Procedures: {_join(procedures)}.",
            f"Care plan: {plan}.",
        ]
    )


def case_prompt(snapshot: Snapshot) -> list[dict[str, str]]:
    """System and user messages for one case, without the answer (inference)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": snapshot_text(snapshot)},
    ]


def dialogue(case: Case) -> dict:
    """One training line of ``train.jsonl`` / ``heldout.jsonl``."""
    messages = case_prompt(case.snapshot) + [{"role": "assistant", "content": answer_text(case)}]
    return {"id": case.id, "patient": case.patient, "messages": messages}
