"""A cheap drug score without generation: the model ranks the medication lines the federation has seen.

For each held-out case the candidates are the distinct "Start medications: …" lines of the training
dialogues for the case's diagnosis (every training hospital's, the same for every model), plus "none".
The model scores each candidate by its log-likelihood after the prompt, teacher-forced: the prompt is
read once and its cache reused for every candidate. The top candidate is scored like a generated answer
(drug-F1 through the same vocabulary), and the true line's rank is kept where it is among the candidates.
`bench/likelihood_agreement.py` measures how well this agrees with greedy generation.
"""

from __future__ import annotations

import copy
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.metrics import set_scores
from federimed.evaluation.runner import HeldoutCase
from federimed.precision import training_autocast
from federimed.serving.backend import prompt_ids
from ingest.dialogues import MEDICATION_PREFIX, NONE
from ingest.jsonl import read_jsonl

FALLBACK_CANDIDATES = 20
"""Candidates for a diagnosis no training dialogue has: the most frequent medication lines overall."""


@dataclass(frozen=True)
class Candidates:
    """Medication lines ("amoxicillin, clavulanate", "none") per diagnosis code, from training dialogues."""

    by_diagnosis: dict[str, tuple[str, ...]]
    fallback: tuple[str, ...]

    @classmethod
    def from_training(cls, hospital_dirs: Iterable[Path]) -> Candidates:
        """Read each hospital's `train.jsonl` and `targets.train.jsonl` (joined by case id)."""
        by_diagnosis: dict[str, Counter[str]] = defaultdict(Counter)
        overall: Counter[str] = Counter()
        for folder in hospital_dirs:
            diagnosis = {t["id"]: t["diagnosis"]["code"] for t in read_jsonl(folder / "targets.train.jsonl")}
            for dialogue in read_jsonl(folder / "train.jsonl"):
                line = medication_line(dialogue["messages"][-1]["content"])
                if line is None or dialogue["id"] not in diagnosis:
                    raise ValueError(f"{folder / 'train.jsonl'}: case {dialogue['id']} has no medication line "
                                     "or no target")
                by_diagnosis[diagnosis[dialogue["id"]]][line] += 1
                overall[line] += 1
        if not overall:
            raise ValueError("no training dialogues to take candidate medication lines from")
        ranked = {code: tuple(line for line, _ in counts.most_common()) for code, counts in by_diagnosis.items()}
        return cls(ranked, tuple(line for line, _ in overall.most_common(FALLBACK_CANDIDATES)))

    def for_diagnosis(self, code: str) -> tuple[str, ...]:
        lines = self.by_diagnosis.get(code, self.fallback)
        return lines if NONE in lines else (*lines, NONE)


def medication_line(answer: str) -> str | None:
    """The drug list of an answer's first line ("Start medications: a, b." → "a, b"), or None."""
    first = answer.split("\n", 1)[0]
    if not first.startswith(MEDICATION_PREFIX):
        return None
    return first[len(MEDICATION_PREFIX):].removesuffix(".").strip()


@dataclass
class LikelihoodScore:
    id: str
    hospital: str
    predicted_drugs: list[str]
    drug_f1: float
    true_rank: int | None  # 1 = the model's top candidate; None: the true line is not among the candidates
    candidates: int


@torch.no_grad()
def candidate_logprobs(model: Any, tokenizer: Any, messages: list[dict[str, str]], lines: Sequence[str]) -> list[float]:
    """Log-probability of each "Start medications: <line>.\\n" after the chat prompt `messages`, less a term
    all candidates share (the tokens they have in common), so that only their order is meaningful.

    The shared tokens (prompt, assistant header, the line's opening words) are read once; the candidates'
    own tokens are then read together, one row each, on copies of that cache. Rows are padded on the
    right, which causal attention never lets an earlier token see."""
    prompt = prompt_ids(tokenizer, messages)
    full = [prompt + tokenizer.encode(f"{MEDICATION_PREFIX}{line}.\n", add_special_tokens=False) for line in lines]
    # the tokens all candidates share, less one: each keeps at least one token of its own
    shared = min(len(os.path.commonprefix(full)), min(len(f) for f in full) - 1)
    device = next(model.parameters()).device
    out = model(torch.tensor([full[0][:shared]], device=device), use_cache=True)
    own = [f[shared:] for f in full]
    width = max(len(o) for o in own)
    targets = torch.tensor([o + [0] * (width - len(o)) for o in own], device=device)
    logprobs = out.logits[0, -1].float().log_softmax(-1)[targets[:, 0]]  # each candidate's first own token
    if width > 1:
        cache = copy.deepcopy(out.cache)
        cache.batch_repeat_interleave(len(own))
        step = model(targets[:, :-1], cache=cache, use_cache=True).logits.float().log_softmax(-1)
        later = step.gather(2, targets[:, 1:, None])[..., 0]
        mask = torch.tensor([[j < len(o) - 1 for j in range(width - 1)] for o in own], device=device)
        logprobs = logprobs + (later * mask).sum(1)
    return logprobs.tolist()


def score_case(model: Any, tokenizer: Any, case: HeldoutCase, candidates: Candidates,
               vocab: DrugVocabulary) -> LikelihoodScore:
    """Rank the case's candidate lines by the model's likelihood; score the top one as an answer."""
    lines = candidates.for_diagnosis(case.diagnosis)
    logprobs = candidate_logprobs(model, tokenizer, case.messages, lines)
    order = sorted(range(len(lines)), key=lambda i: -logprobs[i])
    predicted = vocab.extract(f"{MEDICATION_PREFIX}{lines[order[0]]}.")
    truth = medication_line(case.reference)
    rank = next((r for r, i in enumerate(order, 1) if lines[i] == truth), None)
    return LikelihoodScore(case.id, case.hospital, sorted(predicted), set_scores(predicted, set(case.drugs)).f1,
                           rank, len(lines))


def score_cases(
    model: Any, tokenizer: Any, cases: Sequence[HeldoutCase], candidates: Candidates, vocab: DrugVocabulary, *,
    precision: str = "auto",
) -> list[LikelihoodScore]:
    """`score_case` for every case, in eval mode, under the autocast training would use (`precision`: bf16
    products where the CPU has AMX or AVX512-BF16, as the held-out loss is computed)."""
    model.eval()
    with training_autocast(precision, next(model.parameters()).device):
        return [score_case(model, tokenizer, case, candidates, vocab) for case in cases]

