"""Does the likelihood score agree with scoring by generation, and what does each cost?

    .venv/bin/python bench/likelihood_agreement.py [--run latest] [--data data/hospitals] [--runs-dir runs]

Every model `federimed evaluate` compares (base, local-only, federated, centralized, found beside the
federated run), and the global adapter after each round, is scored on every held-out case twice: by greedy
generation (the evaluation's engine, 48 tokens, no retrieval) and by the likelihood score
(`federimed.evaluation.likelihood`: the model ranks the training dialogues' medication lines for the case's
diagnosis). Per model: both drug-F1s, seconds for each, the share of cases where both predict the same drug
set, and the correlation of the per-case F1s. Across models: Spearman's rank correlation of the two means,
and the paired difference federated − best local-only under each score.
Writes bench/results/likelihood_agreement.json and likelihood_agreement.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "likelihood_agreement.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest", help="the federated run (its baselines are found beside it)")
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()

    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from federimed.checkpoints import RunDir, resolve_checkpoint, round_metrics
    from federimed.cpu import this_cpu
    from federimed.evaluation.compare import Contender, find_contenders, vocabulary
    from federimed.evaluation.likelihood import Candidates, score_cases
    from federimed.evaluation.metrics import paired_difference
    from federimed.evaluation.runner import load_heldout, score_model
    from federimed.model import load_for_inference
    from federimed.serving.select import load_engine

    run = RunDir(resolve_checkpoint(args.run, args.runs_dir).parent)
    hospitals = sorted(run.info()["hospitals"])
    settings = run.settings().model
    cases = load_heldout(args.data, hospitals)
    vocab = vocabulary([args.data])
    candidates = Candidates.from_training([args.data / h for h in hospitals])
    contenders, missing = find_contenders(run, ["base", "local", "federated", "centralized"])
    rounds = [int(m["round"]) for m in round_metrics(run.path)][:-1]  # the last round is "federated"
    contenders += [Contender(f"round-{n}", "round", run.path / f"round-{n}") for n in rounds]

    models = {}
    for contender in contenders:
        model, tokenizer = load_for_inference(settings, contender.adapter)
        start = time.perf_counter()
        by_likelihood = score_cases(model, tokenizer, cases, candidates, vocab)
        likelihood_s = time.perf_counter() - start
        engine = load_engine(settings, contender.adapter, loaded=(model, tokenizer), purpose="evaluation")
        start = time.perf_counter()
        by_generation = score_model(contender.label, engine, cases, vocab).cases
        generation_s = time.perf_counter() - start
        gen = [c.drug_f1 for c in by_generation]
        lik = [s.drug_f1 for s in by_likelihood]
        ranks = [s.true_rank for s in by_likelihood]
        models[contender.label] = {
            "generation_f1": float(np.mean(gen)), "likelihood_f1": float(np.mean(lik)),
            "generation_s": round(generation_s, 1), "likelihood_s": round(likelihood_s, 1),
            "same_drug_set": float(np.mean([set(g.predicted_drugs) == set(s.predicted_drugs)
                                            for g, s in zip(by_generation, by_likelihood)])),
            "per_case_pearson": float(pearsonr(gen, lik)[0]) if np.std(gen) and np.std(lik) else None,
            "true_line_mrr": float(np.mean([1 / r if r else 0.0 for r in ranks])),
            "per_case": {"generation": gen, "likelihood": lik},
        }
        print(f"{contender.label}: generation {models[contender.label]['generation_f1']:.3f} in {generation_s:.0f} s, "
              f"likelihood {models[contender.label]['likelihood_f1']:.3f} in {likelihood_s:.0f} s", flush=True)
        del model, engine

    labels = list(models)
    locals_ = [m for m in labels if m.startswith("local:")]
    paired = {}
    for score in ("generation", "likelihood"):
        best = max(locals_, key=lambda m: models[m][f"{score}_f1"])
        diff = paired_difference(models["federated"]["per_case"][score], models[best]["per_case"][score])
        paired[score] = {"best_local": best, "mean": diff.mean, "low": diff.low, "high": diff.high, "n": diff.n}
    rho = spearmanr([models[m]["generation_f1"] for m in labels], [models[m]["likelihood_f1"] for m in labels])
    report = {
        "run": run.id, "cases": len(cases), "candidates_per_case": float(np.mean(
            [len(candidates.for_diagnosis(c.diagnosis)) for c in cases])),
        "models": models, "missing": missing,
        "spearman_across_models": float(rho.statistic), "spearman_p": float(rho.pvalue),
        "federated_minus_best_local": paired,
        "seconds": {s: round(sum(m[f"{s}_s"] for m in models.values()), 1) for s in ("generation", "likelihood")},
        "machine": {"cpu": this_cpu().summary(), "cores": os.cpu_count(),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS.with_suffix(".png"))
    print(f"Spearman across {len(labels)} models: {report['spearman_across_models']:.2f}; "
          f"seconds: {report['seconds']}; wrote {RESULTS}")


def plot(report: dict, path: Path) -> None:
    """Each model's drug-F1 by generation against by likelihood, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, m in report["models"].items():
        ax.scatter(m["generation_f1"], m["likelihood_f1"], color="tab:blue" if label.startswith("round") else "tab:red")
        ax.annotate(label, (m["generation_f1"], m["likelihood_f1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set(xlabel="drug-F1, greedy generation", ylabel="drug-F1, likelihood of candidate lines", xlim=(0, 1), ylim=(0, 1),
           title=f"{report['cases']} held-out cases; Spearman {report['spearman_across_models']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
