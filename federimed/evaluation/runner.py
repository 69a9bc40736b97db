"""Answer every held-out case with one model (greedy, through a generation engine) and score the answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.metrics import bootstrap_ci, recall, rouge_l, set_scores
from federimed.serving.backend import Engine, answer_text, prompt_ids
from ingest.jsonl import read_jsonl


@dataclass(frozen=True)
class HeldoutCase:
    """One held-out decision: the prompt the model sees, the true answer and the structured target."""

    id: str
    hospital: str
    messages: list[dict[str, str]]  # system + user (no answer)
    reference: str  # the assistant turn of the dialogue: what was actually started
    drugs: frozenset[str]  # ingredients actually started
    procedures: tuple[str, ...]
    careplans: tuple[str, ...]
    diagnosis: str = ""  # SNOMED code of the new diagnosis behind the decision

    @property
    def case_text(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")


@dataclass
class CaseScore:
    id: str
    hospital: str
    answer: str
    predicted_drugs: list[str]
    drug_precision: float
    drug_recall: float
    drug_f1: float
    procedure_recall: float | None
    careplan_recall: float | None
    rouge_l: float


@dataclass
class ModelScores:
    """All case scores of one model under one retrieval setting, plus its held-out loss."""

    model: str
    retrieval: bool
    cases: list[CaseScore] = field(default_factory=list)
    heldout_loss: float | None = None

    def summary(self, hospital: str | None = None) -> dict[str, Any]:
        """Mean and 95 % bootstrap interval of each metric, pooled or for one hospital."""
        rows = [c for c in self.cases if hospital is None or c.hospital == hospital]
        out: dict[str, Any] = {"n": len(rows)}
        for metric in ("drug_precision", "drug_recall", "drug_f1", "procedure_recall", "careplan_recall", "rouge_l"):
            values = [getattr(c, metric) for c in rows if getattr(c, metric) is not None]
            out[metric] = asdict(bootstrap_ci(values))
        return out


def load_heldout(data_dir: Path, hospitals: Sequence[str]) -> list[HeldoutCase]:
    """The held-out dialogues of `hospitals` joined with their structured targets (by case id)."""
    cases = []
    for hospital in hospitals:
        folder = data_dir / hospital
        targets = {t["id"]: t for t in read_jsonl(folder / "targets.heldout.jsonl")}
        for dialogue in read_jsonl(folder / "heldout.jsonl"):
            target = targets.get(dialogue["id"])
            if target is None:
                raise ValueError(f"{folder / 'heldout.jsonl'}: case {dialogue['id']} has no target")
            messages = [m for m in dialogue["messages"] if m["role"] != "assistant"]
            reference = next(m["content"] for m in dialogue["messages"] if m["role"] == "assistant")
            cases.append(
                HeldoutCase(
                    id=dialogue["id"],
                    hospital=hospital,
                    messages=messages,
                    reference=reference,
                    drugs=frozenset(i for d in target["drugs"] for i in d["ingredients"]),
                    procedures=tuple(_clean(p["display"]) for p in target["procedures"]),
                    careplans=tuple(_clean(p["display"]) for p in target["careplans"]),
                    diagnosis=target["diagnosis"]["code"],
                )
            )
    return cases


def _clean(display: str) -> str:
    """Lower-case display text without its SNOMED semantic tag ("Spirometry (procedure)" → "spirometry")."""
    text = display.lower()
    return text[: text.rfind(" (")].strip() if text.endswith(")") and " (" in text else text.strip()


def score_answer(case: HeldoutCase, answer: str, vocab: DrugVocabulary) -> CaseScore:
    """Score one free-text answer against what the patient actually received."""
    predicted = vocab.extract(answer)
    drugs = set_scores(predicted, set(case.drugs))
    lowered = answer.lower()
    return CaseScore(
        id=case.id,
        hospital=case.hospital,
        answer=answer,
        predicted_drugs=sorted(predicted),
        drug_precision=drugs.precision,
        drug_recall=drugs.recall,
        drug_f1=drugs.f1,
        procedure_recall=recall({p for p in case.procedures if p in lowered}, set(case.procedures)),
        careplan_recall=recall({p for p in case.careplans if p in lowered}, set(case.careplans)),
        rouge_l=rouge_l(answer, case.reference),
    )


def generate_batch(
    engine: Engine, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int = 48, batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to many chat prompts, `batch_size` decoded together (see `federimed.serving.select.load_engine`)."""
    ids = [prompt_ids(engine.tokenizer, p) for p in prompts]
    answers = engine.greedy(ids, max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch)
    return [answer_text(engine.tokenizer, a) for a in answers]


def score_model(
    label: str,
    engine: Engine,
    cases: Sequence[HeldoutCase],
    vocab: DrugVocabulary,
    *,
    prompts: Sequence[list[dict[str, str]]] | None = None,
    retrieval: bool = False,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> ModelScores:
    """Generate and score answers for every case (`prompts` override the cases' own, e.g. with snippets)."""
    answers = generate_batch(
        engine, prompts or [c.messages for c in cases], max_new_tokens=max_new_tokens,
        batch_size=batch_size, on_batch=on_batch,
    )
    return ModelScores(label, retrieval, [score_answer(c, a, vocab) for c, a in zip(cases, answers)])
