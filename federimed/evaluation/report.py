"""The evaluation report: report.json, report.md, and two plots (comparison bars, F1 per round)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from federimed.evaluation.compare import WITH_COUNTS
from federimed.evaluation.metrics import paired_difference
from federimed.evaluation.runner import HeldoutCase, ModelScores

METRICS = ("drug_f1", "drug_precision", "drug_recall", "procedure_recall", "careplan_recall", "rouge_l")


def build_report(
    run_id: str,
    scores: Sequence[ModelScores],
    cases: Sequence[HeldoutCase],
    *,
    rounds: Sequence[dict[str, float]] = (),
    external: Sequence[ModelScores] = (),
    counts: Sequence[ModelScores] = (),
    missing: Sequence[str] = (),
    n_examples: int = 3,
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data. `counts` are the counting baselines
    (`federimed.evaluation.counting`), scored on the same cases."""
    hospitals = sorted({c.hospital for c in cases})

    def entry(s: ModelScores) -> dict[str, Any]:
        return {
            "model": s.model,
            "retrieval": s.retrieval,
            "heldout_loss": s.heldout_loss,
            "pooled": s.summary(),
            "per_hospital": {h: s.summary(h) for h in hospitals},
            "case_drug_f1": case_f1(s),
        }

    models = [entry(s) for s in scores]
    by_id = {c.id: c for c in cases}
    examples = []
    for case_id in [c.id for c in cases if c.drugs][:n_examples]:
        answers = {
            f"{s.model}{' +RAG' if s.retrieval else ''}": next(c.answer for c in s.cases if c.id == case_id)
            for s in scores
        }
        case = by_id[case_id]
        examples.append({"hospital": case.hospital, "case": case.case_text, "truth": case.reference, "answers": answers})
    return {
        "run": run_id,
        "hospitals": hospitals,
        "cases": len(cases),
        "case_hospitals": {c.id: c.hospital for c in cases},
        "models": models,
        "f1_per_round": list(rounds),
        "external": [{"model": s.model, "retrieval": s.retrieval, "pooled": s.summary(), "case_drug_f1": case_f1(s)}
                     for s in external],
        "counts": [entry(s) for s in counts],
        "paired": paired_differences(scores, counts),
        "missing": list(missing),
        "examples": examples,
    }


def case_f1(scores: ModelScores) -> dict[str, float]:
    """Drug-F1 of every case, by case id: what pairs models (and seeds) case by case."""
    return {c.id: c.drug_f1 for c in scores.cases}


VS_BEST_LOCAL = "federated − best local-only"
VS_CENTRALIZED = "federated − 0.9 × centralized"
VS_BASE = "federated − base"
"""Labels of the paired differences that decide FederiMed's claim (the report's and the experiment's)."""


def own_cases_label(hospital: str) -> str:
    """The paired difference of the federated model and one hospital alone, on that hospital's cases."""
    return f"federated − {hospital} alone, on its own cases"


def paired_differences(scores: Sequence[ModelScores], counts: Sequence[ModelScores] = ()) -> list[dict[str, Any]]:
    """Per-case drug-F1 differences that decide FederiMed's claim, with paired 95 % bootstrap intervals,
    for each retrieval setting: federated − best local-only (the best by mean), federated − each hospital
    alone on that hospital's own cases, federated − 0.9 × centralized, federated − base, and every model −
    pooled counts."""
    def pair(a: ModelScores, b: ModelScores, label: str, scale: float = 1.0, hospital: str | None = None) -> dict[str, Any]:
        right = case_f1(b)
        left = {c.id: c.drug_f1 for c in a.cases if hospital is None or c.hospital == hospital}
        ids = [i for i in left if i in right]
        interval = paired_difference([left[i] for i in ids], [right[i] for i in ids], scale=scale)
        return {"comparison": label, "retrieval": a.retrieval, **asdict(interval)}

    rows = []
    pooled = next((c for c in counts if c.model == "counts:pooled"), None)
    for retrieval in sorted({s.retrieval for s in scores}):
        models = {s.model: s for s in scores if s.retrieval == retrieval}
        federated = models.get("federated")
        locals_ = [s for name, s in models.items() if name.startswith("local:")]
        if federated is not None:
            if locals_:
                best = max(locals_, key=lambda s: s.summary()["drug_f1"]["mean"] or 0.0)
                rows.append(pair(federated, best, f"{VS_BEST_LOCAL} ({best.model})"))
            for own in locals_:
                hospital = own.model.removeprefix("local:")
                rows.append(pair(federated, own, own_cases_label(hospital), hospital=hospital))
            if "centralized" in models:
                rows.append(pair(federated, models["centralized"], VS_CENTRALIZED, scale=0.9))
            if "base" in models:
                rows.append(pair(federated, models["base"], VS_BASE))
            if WITH_COUNTS in models:
                rows.append(pair(models[WITH_COUNTS], federated, "federated with cohort counts − federated"))
        if pooled is not None:
            rows += [pair(s, pooled, f"{name} − pooled counts") for name, s in models.items()]
    return rows


def _cell(summary: dict[str, Any], metric: str) -> str:
    ci = summary[metric]
    if ci["mean"] is None:
        return "–"
    if ci["low"] is None:  # a single case: no interval
        return f"{ci['mean']:.2f}"
    return f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def _label(model: dict[str, Any]) -> str:
    return f"{model['model']}{' +RAG' if model['retrieval'] else ''}"


def comparison_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per model and retrieval setting: label, n, metrics with 95 % CIs, held-out loss."""
    rows = []
    for m in [*report["models"], *report.get("counts", [])]:
        loss = m["heldout_loss"]
        rows.append(
            [_label(m), str(m["pooled"]["n"]), *(_cell(m["pooled"], k) for k in METRICS),
             "–" if loss is None else f"{loss:.3f}"]
        )
    return rows


def _interval(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "–"
    if row["low"] is None:
        return f"{row['mean']:+.2f}"
    return f"{row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"


def paired_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per paired difference: comparison, retrieval, mean difference [95 % interval], n."""
    return [[r["comparison"], "on" if r["retrieval"] else "off", _interval(r), str(r["n"])]
            for r in report.get("paired", [])]


def verdict(report: dict[str, Any]) -> str:
    """One plain sentence: did federated beat the best hospital alone on this run (no retrieval), and
    is the paired interval clear of zero?"""
    row = next((r for r in report.get("paired", []) if r["comparison"].startswith(VS_BEST_LOCAL)
                and not r["retrieval"]), None)
    if row is None or row["mean"] is None:
        return "Federated against local-only: not compared on this run."
    best = row["comparison"].split("(")[-1].rstrip(")")
    if row["low"] is not None and row["low"] > 0:
        outcome, certainty = "beat", "the 95 % paired interval lies above 0"
    elif row["high"] is not None and row["high"] < 0:
        outcome, certainty = "did worse than", "the 95 % paired interval lies below 0"
    else:
        outcome, certainty = "against", "the 95 % paired interval includes 0, so this run cannot tell them apart"
    return (f"Federated {outcome} the best hospital alone ({best}): {_interval(row)} drug-F1 on {row['n']} "
            f"held-out cases; {certainty}.")


def rich_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Held-out evaluation of {report['run']} ({report['cases']} cases, 95 % bootstrap CIs)")
    for column in ("model", "n", *METRICS, "held-out loss"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in comparison_rows(report):
        table.add_row(*row)
    return table


def rich_paired(report: dict[str, Any]) -> Table:
    table = Table(title="Paired differences in drug F1 (same cases, 95 % paired bootstrap)", caption=verdict(report))
    for column in ("comparison", "retrieval", "difference", "n"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in paired_rows(report):
        table.add_row(*row)
    return table


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md, comparison.png and (with round data) f1_per_round.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    _plot_comparison(report, out_dir / "comparison.png")
    if report["f1_per_round"]:
        _plot_rounds(report, out_dir / "f1_per_round.png")
    parts = [
        f"# Evaluation of {report['run']}",
        f"{report['cases']} held-out cases from {', '.join(report['hospitals'])}. Drug metrics compare the "
        "ingredients an answer names with those the patient actually started; 95 % bootstrap intervals in brackets.",
        "## Comparison (pooled)",
        _markdown_table(["model", "n", *METRICS, "held-out loss"], comparison_rows(report)),
        "![comparison](comparison.png)",
        "Rows `counts:*` are the counting baseline (no model): each case gets the drug set that training "
        "cases with the same diagnosis code most often received, counted over all hospitals (pooled) or one "
        "(local); `(k=N)` suppresses diagnoses seen in fewer than N training patients.",
        "## Paired differences (drug F1, same cases)",
        f"**{verdict(report)}**",
        _markdown_table(["comparison", "retrieval", "mean difference [95 % interval]", "n"], paired_rows(report)),
        "## Drug F1 per hospital",
        _markdown_table(
            ["model", *report["hospitals"]],
            [[_label(m), *(_cell(m["per_hospital"][h], "drug_f1") for h in report["hospitals"])] for m in report["models"]],
        ),
    ]
    if report["f1_per_round"]:
        parts += [
            "## Federated drug F1 per round",
            _markdown_table(["round", "drug F1"], [[str(r["round"]), f"{r['drug_f1']:.3f}"] for r in report["f1_per_round"]]),
            "![F1 per round](f1_per_round.png)",
        ]
    if report["external"]:
        parts += [
            "## Hospital that took no part in training",
            _markdown_table(
                ["model", "n", "drug F1"],
                [[_label(m), str(m["pooled"]["n"]), _cell(m["pooled"], "drug_f1")] for m in report["external"]],
            ),
        ]
    if report["missing"]:
        parts += ["## Not evaluated", "\n".join(f"- {m}" for m in report["missing"])]
    parts.append("## Examples")
    for i, ex in enumerate(report["examples"], 1):
        answers = "\n".join(f"- **{label}**: {text.replace(chr(10), ' ')}" for label, text in ex["answers"].items())
        parts.append(
            f"### Case {i} ({ex['hospital']})\n```\n{ex['case']}\n```\n**Truth**: {ex['truth'].replace(chr(10), ' ')}\n\n{answers}"
        )
    path = out_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def _plot_comparison(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [*report["models"], *report.get("counts", [])]
    labels = [_label(m) for m in models]
    cis = [m["pooled"]["drug_f1"] for m in models]
    means = [ci["mean"] or 0.0 for ci in cis]
    errors = [
        [mean - ci["low"] if ci["low"] is not None else 0 for ci, mean in zip(cis, means)],
        [ci["high"] - mean if ci["high"] is not None else 0 for ci, mean in zip(cis, means)],
    ]
    colours = ["#9e9e9e" if m["model"] == "base" else "#1f77b4" if m["model"] == "federated" else
               "#2ca02c" if m["model"] == "centralized" else "#9467bd" if m["model"].startswith("counts:") else
               "#ff7f0e" for m in models]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models)), 4))
    ax.bar(range(len(models)), means, yerr=errors, color=colours, capsize=3)
    ax.set_xticks(range(len(models)), labels, rotation=30, ha="right")
    ax.set_ylabel("drug F1 (pooled held-out cases)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['run']}: base, local-only, federated, centralized and counting baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rounds(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["f1_per_round"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["round"] for r in rounds], [r["drug_f1"] for r in rounds], marker="o")
    ax.set_xlabel("federated round (0: the base model)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("drug F1 (held-out)")
    ax.set_ylim(0, 1)
    ax.set_title("Global adapter after each round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
