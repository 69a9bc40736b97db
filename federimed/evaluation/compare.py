"""Compare base, local-only, federated and centralized adapters on the same held-out cases."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federimed.checkpoints import CheckpointError, RunDir, finished_runs, latest_round, round_metrics
from federimed.config import ModelSettings
from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.runner import HeldoutCase, ModelScores, score_model

KINDS = ("base", "local", "federated", "centralized")
WITH_COUNTS = "federated+counts"
"""Label of the federated model answering with the cohort counts as context."""
Progress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass(frozen=True)
class Contender:
    """One model under evaluation: a label and its adapter (None: the bare base model)."""

    label: str
    kind: str
    adapter: Path | None


def find_contenders(federated: RunDir, kinds: Sequence[str]) -> tuple[list[Contender], list[str]]:
    """The models to compare, found beside the federated run; and a note for each one that is missing."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown model kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    hospitals = set(federated.info()["hospitals"])
    contenders, missing = [], []

    def newest(mode: str, trained_on: set[str]) -> Path | None:
        for run in reversed(finished_runs(federated.runs_dir, mode, trained_on)):
            if last := latest_round(run):
                return last[1]
        return None

    for kind in kinds:
        if kind == "base":
            contenders.append(Contender("base", "base", None))
        elif kind == "federated":
            last = latest_round(federated.path)
            if last is None:
                raise CheckpointError(f"run {federated.id} has no saved round yet")
            contenders.append(Contender("federated", "federated", last[1]))
        elif kind == "centralized":
            found = newest("centralized", hospitals)
            if found:
                contenders.append(Contender("centralized", kind, found))
            else:
                missing.append(f"centralized: no centralized run on {', '.join(sorted(hospitals))} in {federated.runs_dir}")
        else:
            for hospital in sorted(hospitals):
                found = newest("local-only", {hospital})
                if found:
                    contenders.append(Contender(f"local:{hospital}", kind, found))
                else:
                    missing.append(f"local:{hospital}: no local-only run for {hospital} in {federated.runs_dir}")
    return contenders, missing


def retrieval_prompts(cases: Sequence[HeldoutCase], index_dir: Path | None, k: int = 3) -> list[list[dict[str, str]]]:
    """Each case's prompt with its top-`k` guideline snippets, as the chat builds it."""
    from federimed.assistant import build_prompt, retrieval_query
    from federimed.retrieval import GuidelineIndex, ensure_default_index

    index = GuidelineIndex.load(index_dir) if index_dir else ensure_default_index()
    return [build_prompt(c.case_text, index.search(retrieval_query(c.case_text), k=k)) for c in cases]


def cohort_prompts(cases: Sequence[HeldoutCase], artefact: dict[str, Any]) -> list[list[dict[str, str]]]:
    """Each case's prompt with the federation's released cohort counts for it in the system message, as
    retrieval adds guideline excerpts (the model was never trained with them: measured, not assumed)."""
    from federimed.assistant import build_prompt
    from federimed.cohort import for_case

    prompts = []
    for case in cases:
        system, user = build_prompt(case.case_text, [])
        if counts := for_case(artefact, case.case_text):
            system = {**system, "content": f"{system['content']}\n\nWhat patients like this received across the "
                                           f"federation: {counts.replace('**', '')}"}
        prompts.append([system, user])
    return prompts


def score_with_counts(
    federated: Contender, cases: Sequence[HeldoutCase], vocab: DrugVocabulary, artefact: dict[str, Any], *,
    settings: ModelSettings, max_new_tokens: int = 48, batch_size: int = 8,
) -> ModelScores:
    """The federated model answering with the cohort counts in its prompt (`cohort_prompts`), labelled
    `WITH_COUNTS`."""
    from federimed.serving.select import load_engine

    engine = load_engine(settings, federated.adapter, purpose="evaluation")
    return score_model(WITH_COUNTS, engine, cases, vocab, prompts=cohort_prompts(cases, artefact),
                       max_new_tokens=max_new_tokens, batch_size=batch_size)


def heldout_loss(model: Any, tokenizer: Any, cases: Sequence[HeldoutCase], seq_len: int) -> float:
    """Mean loss on the true answers (assistant tokens only) of the held-out dialogues."""
    from federimed.training import encode_dialogues, evaluate_loss

    dialogues = [{"messages": [*c.messages, {"role": "assistant", "content": c.reference}]} for c in cases]
    loss, _ = evaluate_loss(model, encode_dialogues(tokenizer, dialogues, seq_len))
    return loss


def evaluate_contenders(
    contenders: Sequence[Contender],
    cases: Sequence[HeldoutCase],
    vocab: DrugVocabulary,
    *,
    retrieval: Sequence[bool],
    settings: ModelSettings,
    index_dir: Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    seq_len: int = 256,
    progress: Progress | None = None,
) -> list[ModelScores]:
    """Every contender × retrieval setting on the same cases; held-out loss (at the run's `seq_len`)
    once per contender."""
    from federimed.model import load_for_inference
    from federimed.serving.select import load_engine

    with_snippets = retrieval_prompts(cases, index_dir) if True in retrieval else None
    results = []
    total = len(contenders) * len(retrieval) * len(cases)
    done = 0
    for contender in contenders:
        model, tokenizer = load_for_inference(settings, contender.adapter)
        loss = heldout_loss(model, tokenizer, cases, seq_len)
        engine = load_engine(settings, contender.adapter, loaded=(model, tokenizer), purpose="evaluation")
        for use_retrieval in retrieval:

            def tick(n: int, label: str = contender.label) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(label, done, total)

            scores = score_model(
                contender.label, engine, cases, vocab, prompts=with_snippets if use_retrieval else None,
                retrieval=use_retrieval, max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=tick,
            )
            scores.heldout_loss = loss
            results.append(scores)
        del model, engine
    return results


def f1_per_round(
    federated: RunDir,
    cases: Sequence[HeldoutCase],
    vocab: DrugVocabulary,
    settings: ModelSettings,
    known: dict[int, float] | None = None,
    points: int | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> list[dict[str, float]]:
    """Pooled drug F1 (no retrieval) of the global adapter after each federated round (at most `points` of
    them, evenly spaced: see `spaced_rounds`), from round 0 (the base model) when `known` has it; rounds in
    `known` (round → F1, e.g. the last one, already scored as "federated") are not generated again."""
    from federimed.serving.select import load_engine

    known = known or {}
    rows = [{"round": 0, "drug_f1": known[0]}] if 0 in known else []
    saved = [int(m["round"]) for m in round_metrics(federated.path)]
    chosen = spaced_rounds(saved, points or len(saved))
    total, done = len(cases) * sum(1 for n in chosen if n not in known), 0
    for n in chosen:
        if n in known:
            rows.append({"round": n, "drug_f1": known[n]})
            continue

        def tick(answered: int, label: str = f"round {n}") -> None:
            nonlocal done
            done += answered
            if progress:
                progress(label, done, total)

        engine = load_engine(settings, federated.path / f"round-{n}", purpose="evaluation")
        scores = score_model(f"round-{n}", engine, cases, vocab, on_batch=tick, **kwargs)
        rows.append({"round": n, "drug_f1": scores.summary()["drug_f1"]["mean"]})
    return rows


def spaced_rounds(rounds: Sequence[int], points: int) -> list[int]:
    """At most `points` of `rounds`, evenly spaced and ending with the last (8 rounds, 4 points: 2, 4, 6, 8):
    each point costs a full evaluation, and a few of them show the curve."""
    ordered = sorted(rounds)
    if len(ordered) <= points:
        return ordered
    return [ordered[math.ceil(len(ordered) * k / points) - 1] for k in range(1, points + 1)]


def vocabulary(data_dirs: Sequence[Path]) -> DrugVocabulary:
    """Drug vocabulary from every targets file of every hospital under `data_dirs`."""
    return DrugVocabulary.from_targets(sorted(p for d in data_dirs for p in d.glob("*/targets.*.jsonl")))
