"""Per-case scores (set precision/recall/F1, ROUGE-L) and bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@dataclass(frozen=True)
class SetScore:
    precision: float
    recall: float
    f1: float


def set_scores(predicted: set[str], truth: set[str]) -> SetScore:
    """Precision, recall and F1 of a predicted set against the true set.

    Conventions for empty sets: nothing due and nothing predicted scores 1.0 everywhere; an empty
    prediction when something was due, or any prediction when nothing was due, scores F1 0.
    """
    if not predicted and not truth:
        return SetScore(1.0, 1.0, 1.0)
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SetScore(precision, recall, f1)


def recall(predicted: set[str], truth: set[str]) -> float | None:
    """Share of the true items that were predicted; None when there is nothing to recall."""
    return len(predicted & truth) / len(truth) if truth else None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (a secondary, surface-level signal)."""
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence bounds; None where undefined (no values, or one value for the bounds)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean with a percentile-bootstrap confidence interval (no bounds for n < 2, no mean for n = 0)."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(data)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, None, None, n)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n)


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, scale: float = 1.0, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of a − scale·b over the same cases, with a paired percentile-bootstrap interval (the cases
    are resampled together, so what both models find easy or hard cancels out)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same cases: {len(a)} against {len(b)}")
    return bootstrap_ci(
        [x - scale * y for x, y in zip(a, b)], resamples=resamples, level=level, seed=seed
    )
