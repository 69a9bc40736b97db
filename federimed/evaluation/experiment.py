"""Pool the seeds of `federimed experiment`: each model's drug-F1 per seed, and the paired differences that
decide FederiMed's claim, with every case's F1 averaged over the seeds and the cases resampled together
(so what is hard for every model cancels out, and seed noise is averaged before the interval is taken)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from federimed.evaluation.metrics import paired_difference
from federimed.evaluation.report import VS_BASE, VS_BEST_LOCAL, VS_CENTRALIZED, own_cases_label

SeedReports = Mapping[int, dict[str, Any]]
"""`federimed evaluate` reports (report.json) by training seed."""


class ExperimentError(ValueError):
    """The seeds' reports cannot be pooled (a model missing, or different cases)."""


def _plain(report: dict[str, Any], section: str = "models") -> dict[str, dict[str, float]]:
    """Per-case drug-F1 of each model without retrieval in one report section."""
    return {m["model"]: m["case_drug_f1"] for m in report[section] if not m["retrieval"]}


def _best_local(report: dict[str, Any]) -> str:
    """The local-only model with the highest mean drug-F1 on the training hospitals' held-out cases."""
    locals_ = [m for m in report["models"] if m["model"].startswith("local:") and not m["retrieval"]]
    if not locals_:
        raise ExperimentError(f"run {report['run']}: no local-only model was scored")
    return max(locals_, key=lambda m: m["pooled"]["drug_f1"]["mean"] or 0.0)["model"]


def _averaged(per_seed: list[dict[str, float]], what: str) -> dict[str, float]:
    """Each case's F1 averaged over the seeds; every seed must have scored the same cases."""
    cases = set(per_seed[0])
    if any(set(scores) != cases for scores in per_seed):
        raise ExperimentError(f"{what}: the seeds scored different cases (was the data split changed?)")
    return {case: statistics.fmean(scores[case] for scores in per_seed) for case in sorted(cases)}


def _pair(label: str, left: dict[str, float], right: dict[str, float], scale: float = 1.0) -> dict[str, Any]:
    ids = sorted(left)
    return {"comparison": label, **asdict(paired_difference([left[i] for i in ids], [right[i] for i in ids], scale=scale))}


SEED_FREE = frozenset({"base"})
"""Models that no training seed changes (greedy answers of the bare base model): scored by one seed at least."""


def _names(reports: SeedReports, section: str = "models") -> list[str]:
    """Every model (without retrieval) that any seed scored in `section`, in the order they appear."""
    return list(dict.fromkeys(name for report in reports.values() for name in _plain(report, section)))


def _model(reports: SeedReports, name: str, section: str = "models") -> list[dict[str, float]]:
    """The per-case drug-F1 of `name` in every seed's report (of a seed-free model: in those that scored it)."""
    found = []
    for seed, report in sorted(reports.items()):
        scores = _plain(report, section)
        if name in scores:
            found.append(scores[name])
        elif name not in SEED_FREE:
            raise ExperimentError(f"seed {seed}: model {name!r} missing from the {section} of run {report['run']}")
    if not found:
        raise ExperimentError(f"no seed scored model {name!r} in the {section}")
    return found


def pool_seeds(reports: SeedReports, dp_reports: SeedReports | None = None, dp_epsilon: float | None = None) -> dict[str, Any]:
    """The experiment's summary from each seed's report (and the DP-federated run's, scored on the same cases,
    with the ε its training spent)."""
    if not reports:
        raise ExperimentError("no seed was evaluated")
    seeds = sorted(reports)
    first = reports[seeds[0]]
    per_seed = {name: _means(_model(reports, name)) for name in _names(reports)}
    best_locals = [_best_local(reports[s]) for s in seeds]

    def averaged(name: str, section: str = "models") -> dict[str, float]:
        return _averaged(_model(reports, name, section), f"{name} ({section})")

    best_local = _averaged([_plain(reports[s])[b] for s, b in zip(seeds, best_locals)], "best local-only")
    federated = averaged("federated")
    paired = [
        _pair(VS_BEST_LOCAL, federated, best_local),
        _pair(VS_CENTRALIZED, federated, averaged("centralized"), scale=0.9),
        _pair(VS_BASE, federated, averaged("base")),
    ]
    pooled_counts = {c["model"]: c["case_drug_f1"] for c in first["counts"]}.get("counts:pooled")
    if pooled_counts is not None:
        paired.append(_pair("federated − pooled counts", federated, pooled_counts))
    summary: dict[str, Any] = {
        "seeds": seeds,
        "cases": len(federated),
        "hospitals": first["hospitals"],
        "models": {name: _spread(values) for name, values in per_seed.items()},
        "best_local_per_seed": dict(zip(map(str, seeds), best_locals)),
        "counts": {c["model"]: c["pooled"]["drug_f1"]["mean"] for c in first["counts"]},
        "paired": paired,
        "f1_per_round": _rounds(reports),
    }
    if "case_hospitals" in first:
        own = {h: averaged(f"local:{h}") for h in first["hospitals"] if f"local:{h}" in per_seed}
        summary["per_hospital"] = _per_hospital(first["case_hospitals"], federated, own)
    if first.get("external"):
        ext_federated = averaged("federated", "external")
        ext_best = _averaged([_plain(reports[s], "external")[b] for s, b in zip(seeds, best_locals)], "external best local")
        summary["external"] = {
            "cases": len(ext_federated),
            "models": {name: _spread(_means(_model(reports, name, "external"))) for name in _names(reports, "external")},
            "paired": [_pair(f"{VS_BEST_LOCAL} on the external hospital (chosen on the training hospitals)", ext_federated, ext_best)],
        }
    if dp_reports:
        dp = _averaged(_model(dp_reports, "federated"), "DP federated")
        if set(dp) != set(federated):
            raise ExperimentError("the DP-federated model was scored on other cases than the federated one")
        summary["dp"] = {"epsilon": dp_epsilon, "models": {"federated-dp": _spread(_means(_model(dp_reports, "federated")))},
            "paired": [_pair("DP federated − federated (the cost of DP)", dp, federated)]}
    summary["goals"] = _goals(summary)
    return summary


def _per_hospital(case_hospitals: Mapping[str, str], federated: dict[str, float],
                  own_locals: Mapping[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Federated − each hospital alone, on that hospital's own held-out cases: whether joining paid off for
    every hospital, not only on the pooled cases (where the largest hospital's cases weigh most)."""
    rows = []
    for hospital, local in own_locals.items():
        ids = [case for case, where in case_hospitals.items() if where == hospital]
        rows.append(_pair(own_cases_label(hospital),
                          {i: federated[i] for i in ids}, {i: local[i] for i in ids}))
    return rows


def _means(per_seed: list[dict[str, float]]) -> list[float]:
    """Each seed's mean drug-F1 over its cases (the report's pooled mean)."""
    return [statistics.fmean(scores.values()) for scores in per_seed]


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds, and each seed's value."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values}


def _rounds(reports: SeedReports) -> list[dict[str, float]]:
    """The federated adapter's drug-F1 after each round, averaged over the seeds that scored it."""
    by_round: dict[int, list[float]] = {}
    for report in reports.values():
        for row in report.get("f1_per_round", []):
            by_round.setdefault(row["round"], []).append(row["drug_f1"])
    return [{"round": r, "drug_f1": statistics.fmean(v), "seeds": len(v)} for r, v in sorted(by_round.items())]


def _goals(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 13's acceptance, read off the summary: each goal and whether this run met it."""
    paired = {p["comparison"]: p for p in summary["paired"]}
    beats = paired[VS_BEST_LOCAL]
    models = {name: m["mean"] for name, m in summary["models"].items()}
    goals: dict[str, Any] = {
        "federated beats the best local-only (95 % interval above 0)": beats["low"] is not None and beats["low"] > 0,
        "federated ≥ 0.9 × centralized": paired[VS_CENTRALIZED]["mean"] >= 0,
        "base lowest": all(models["base"] < v for name, v in models.items() if name != "base"),
    }
    if summary.get("per_hospital"):
        goals["every hospital: federated above that hospital alone on its own cases"] = all(
            row["mean"] > 0 for row in summary["per_hospital"])
    if "external" in summary:
        goals["external hospital: federated above the best local-only"] = summary["external"]["paired"][0]["mean"] > 0
    if "dp" in summary:
        goals["DP cost in drug-F1"] = summary["dp"]["paired"][0]["mean"]
    return goals


def loss_per_round(curves: Mapping[str, list[list[float | None]]]) -> dict[str, list[dict[str, Any]]]:
    """Each model's held-out loss after each round (`curves`: model → one list of per-round losses per seed),
    averaged over the seeds that recorded it: whether every model had converged when it was scored."""
    pooled = {}
    for model, seeds in curves.items():
        rows = []
        for index in range(max(map(len, seeds), default=0)):
            values = [losses[index] for losses in seeds if index < len(losses) and losses[index] is not None]
            if values:
                rows.append({"round": index + 1, "mean": statistics.fmean(values), "seeds": len(values)})
        pooled[model] = rows
    return pooled


def all_pairs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every paired difference of the summary: on the training hospitals' cases (pooled, then each hospital's
    own), the external hospital's, DP's."""
    return (summary["paired"] + summary.get("per_hospital", []) + summary.get("external", {}).get("paired", [])
            + summary.get("dp", {}).get("paired", []))


def plot_summary(summary: dict[str, Any], path: Path) -> Path:
    """Drug-F1 per model (mean, each seed a dot), the convergence panel (held-out loss per round of every
    trained model, federated drug-F1 per round), and the paired differences with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    left, middle, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    models = summary["models"] | summary.get("dp", {}).get("models", {})
    names = list(models)
    left.bar(names, [models[n]["mean"] for n in names], color="#9ecae1")
    for i, name in enumerate(names):
        left.scatter([i] * len(models[name]["per_seed"]), models[name]["per_seed"], color="#08519c", s=12, zorder=3)
    for label, value in summary["counts"].items():
        left.axhline(value, linestyle="--", linewidth=1, color="#636363" if label == "counts:pooled" else "#bdbdbd")
    left.set_ylabel("drug-F1 (held-out cases)")
    left.set_title(f"{summary['cases']} cases, seeds {', '.join(map(str, summary['seeds']))}; dashes: counting baselines")
    left.tick_params(axis="x", rotation=45)
    _plot_rounds(middle, summary)
    rows = all_pairs(summary)
    for y, row in enumerate(rows):
        if row["low"] is not None:
            right.plot([row["low"], row["high"]], [y, y], color="#08519c")
        right.scatter([row["mean"]], [y], color="#08519c", zorder=3)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(range(len(rows)), [r["comparison"] for r in rows], fontsize=8)
    right.set_xlabel("paired difference in drug-F1 (95 % bootstrap interval)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_rounds(axes: Any, summary: dict[str, Any]) -> None:
    """Held-out loss per round of every trained model and, on a second scale, the federated model's drug-F1."""
    curves = {model: rows for model, rows in summary.get("heldout_loss_per_round", {}).items() if rows}
    for model, rows in curves.items():
        axes.plot([r["round"] for r in rows], [r["mean"] for r in rows], marker="o", markersize=3, label=model)
    axes.set_xlabel("round")
    axes.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        axes.set_yscale("log")
        axes.set_ylabel("held-out loss (mean over seeds, log scale)")
        axes.legend(fontsize=7)
    f1 = summary.get("f1_per_round", [])
    if f1:
        twin = axes.twinx()
        twin.plot([r["round"] for r in f1], [r["drug_f1"] for r in f1], color="black", linestyle=":", marker="s",
                  markersize=3)
        twin.set_ylabel("federated drug-F1 (dotted)")
        twin.set_ylim(0, 1)
    axes.set_title("convergence: held-out loss per round")
