"""The counting baseline: for a held-out case, predict the drug set that training cases with the same
diagnosis code most often received. No model; the floor every trained LLM must reach.

"Pooled counts" count the training cases of every hospital; "local counts" count one hospital's. The
suppressed variant `(k=N)` predicts from what federated cohort statistics release at threshold N
(`federimed.cohort.release`): for the case's diagnosis, the drugs shown that at least half of its
patients were started on; nothing where the diagnosis was suppressed.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from federimed.cohort import CohortCounts, release, stratum_key

from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.runner import HeldoutCase, ModelScores, score_answer


@dataclass
class DrugSetCounts:
    """Per diagnosis code: how often each drug set (of ingredients) was started, and by how many patients."""

    sets: dict[str, Counter[frozenset[str]]] = field(default_factory=lambda: defaultdict(Counter))
    patients: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, diagnosis: str, patient: str, drugs: Iterable[str]) -> None:
        self.sets[diagnosis][frozenset(drugs)] += 1
        self.patients[diagnosis].add(patient)

    @classmethod
    def from_targets(cls, paths: Iterable[Path]) -> DrugSetCounts:
        """Counts over the decisions of `targets.train.jsonl` files."""
        counts = cls()
        for path in paths:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        target = json.loads(line)
                        drugs = (i for d in target["drugs"] for i in d["ingredients"])
                        counts.add(target["diagnosis"]["code"], target["patient"], drugs)
        return counts

    def predict(self, diagnosis: str) -> frozenset[str]:
        """The most frequent drug set for `diagnosis` (ties: the larger set, then alphabetical); empty for a
        diagnosis never seen."""
        if diagnosis not in self.sets:
            return frozenset()
        ranked = sorted(self.sets[diagnosis].items(), key=lambda kv: (-kv[1], -len(kv[0]), sorted(kv[0])))
        return ranked[0][0]


def counts_answer(drugs: frozenset[str]) -> str:
    """The baseline's answer as text, scored by the same drug extraction as a model's answer."""
    return "Start " + ", ".join(sorted(drugs)) + "." if drugs else "No new medication."


def released_prediction(artefact: Mapping[str, Any], diagnosis: str) -> frozenset[str]:
    """What released cohort statistics suggest: the drugs shown for `diagnosis` that at least half of its
    patients were started on (empty when the diagnosis was suppressed)."""
    cell = artefact["strata"].get(stratum_key(diagnosis))
    if cell is None:
        return frozenset()
    return frozenset(drug for drug, n in cell["drugs"].items() if 2 * n >= cell["patients"])


def score_predictions(
    label: str, predict: Callable[[str], frozenset[str]], cases: Sequence[HeldoutCase], vocab: DrugVocabulary
) -> ModelScores:
    """Score a counting baseline (diagnosis code → drugs) on `cases` exactly as a model's answers are scored."""
    answers = [counts_answer(predict(c.diagnosis)) for c in cases]
    return ModelScores(label, False, [score_answer(c, a, vocab) for c, a in zip(cases, answers)])


def train_targets(data_dir: Path, hospitals: Sequence[str]) -> list[Path]:
    """The training targets files of `hospitals` under `data_dir`."""
    paths = [Path(data_dir) / h / "targets.train.jsonl" for h in hospitals]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"training targets missing: {', '.join(missing)}; run `federimed ingest` first")
    return paths


def count_baselines(
    data_dir: Path, hospitals: Sequence[str], cases: Sequence[HeldoutCase], vocab: DrugVocabulary, min_cell: int
) -> list[ModelScores]:
    """Pooled counts and each hospital's local counts on `cases`, without suppression and, when
    `min_cell` > 1, from what cohort statistics release at that threshold."""
    sources = {"counts:pooled": list(hospitals)} | {f"counts:local:{h}": [h] for h in hospitals}
    scores = []
    for label, trained_on in sources.items():
        counts = DrugSetCounts.from_targets(train_targets(data_dir, trained_on))
        scores.append(score_predictions(label, counts.predict, cases, vocab))
        if min_cell > 1:
            cohort = CohortCounts()
            for hospital in trained_on:
                cohort.add(CohortCounts.of_hospital(Path(data_dir) / hospital))
            artefact = release(cohort, min_cell, list(trained_on))
            scores.append(score_predictions(f"{label} (k={min_cell})", partial(released_prediction, artefact), cases,
                                            vocab))
    return scores
