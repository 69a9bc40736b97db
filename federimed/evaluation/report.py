"""The evaluation report: report.json, report.md, and two plots (comparison bars, F1 per round)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from federimed.evaluation.runner import HeldoutCase, ModelScores

METRICS = ("drug_f1", "drug_precision", "drug_recall", "procedure_recall", "careplan_recall", "rouge_l")


def build_report(
    run_id: str,
    scores: Sequence[ModelScores],
    cases: Sequence[HeldoutCase],
    *,
    rounds: Sequence[dict[str, float]] = (),
    external: Sequence[ModelScores] = (),
    missing: Sequence[str] = (),
    n_examples: int = 3,
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data."""
    hospitals = sorted({c.hospital for c in cases})
    models = []
    for s in scores:
        models.append(
            {
                "model": s.model,
                "retrieval": s.retrieval,
                "heldout_loss": s.heldout_loss,
                "pooled": s.summary(),
                "per_hospital": {h: s.summary(h) for h in hospitals},
            }
        )
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
        "models": models,
        "f1_per_round": list(rounds),
        "external": [{"model": s.model, "retrieval": s.retrieval, "pooled": s.summary()} for s in external],
        "missing": list(missing),
        "examples": examples,
    }


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
    for m in report["models"]:
        loss = m["heldout_loss"]
        rows.append(
            [_label(m), str(m["pooled"]["n"]), *(_cell(m["pooled"], k) for k in METRICS),
             "–" if loss is None else f"{loss:.3f}"]
        )
    return rows


def rich_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Held-out evaluation of {report['run']} ({report['cases']} cases, 95 % bootstrap CIs)")
    for column in ("model", "n", *METRICS, "held-out loss"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in comparison_rows(report):
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

    models = report["models"]
    labels = [_label(m) for m in models]
    cis = [m["pooled"]["drug_f1"] for m in models]
    means = [ci["mean"] or 0.0 for ci in cis]
    errors = [
        [mean - ci["low"] if ci["low"] is not None else 0 for ci, mean in zip(cis, means)],
        [ci["high"] - mean if ci["high"] is not None else 0 for ci, mean in zip(cis, means)],
    ]
    colours = ["#9e9e9e" if m["model"] == "base" else "#1f77b4" if m["model"] == "federated" else
               "#2ca02c" if m["model"] == "centralized" else "#ff7f0e" for m in models]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models)), 4))
    ax.bar(range(len(models)), means, yerr=errors, color=colours, capsize=3)
    ax.set_xticks(range(len(models)), labels, rotation=30, ha="right")
    ax.set_ylabel("drug F1 (pooled held-out cases)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['run']}: base vs local-only vs federated vs centralized")
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
