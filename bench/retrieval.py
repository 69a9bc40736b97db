"""Retrieval benchmark: recall@1/3/5 on the labelled cases and per-query search latency.

Latency is wall-clock per search (query embedding + FAISS search); CPU time per search is recorded too,
since wall time on a shared machine mostly measures the other tenants (see environment.load_average_1m).

Builds a fresh index of the shipped corpus in a temporary directory (with a temporary signing key), so the
result does not depend on whatever lies in data/guideline-index. Writes bench/results/retrieval.json.

    .venv/bin/python bench/retrieval.py [--cases tests/data/retrieval_cases.jsonl] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KS = (1, 3, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=REPO / "tests" / "data" / "retrieval_cases.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "retrieval.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per case")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDERIMED_CACHE"] = str(Path(tmp) / "cache")
        import torch

        from federimed.retrieval import GuidelineIndex, build_index, embedding_model
        from ingest.guidelines import shipped_corpus_dir

        started = time.perf_counter()
        embedding_model()
        model_load_s = time.perf_counter() - started
        started = time.perf_counter()
        built = build_index(shipped_corpus_dir(), Path(tmp) / "index")
        build_s = time.perf_counter() - started
        index = GuidelineIndex.load(Path(tmp) / "index")

        cases = [json.loads(line) for line in args.cases.read_text().splitlines() if line.strip()]
        hits = {k: 0 for k in KS}
        reciprocal_ranks, latencies_ms, cpu_ms, misses = [], [], [], []
        index.search("warm-up query", k=max(KS))
        for case in cases:
            for _ in range(args.repeats):
                started, cpu_started = time.perf_counter(), time.process_time()
                snippets = index.search(case["query"], k=max(KS))
                latencies_ms.append((time.perf_counter() - started) * 1000)
                cpu_ms.append((time.process_time() - cpu_started) * 1000)
            sources = [s.source for s in snippets]
            expected = set(case["expected"])
            for k in KS:
                hits[k] += bool(expected & set(sources[:k]))
            rank = next((i for i, source in enumerate(sources, 1) if source in expected), None)
            reciprocal_ranks.append(1 / rank if rank else 0.0)
            if not expected & set(sources[:3]):
                misses.append({"id": case["id"], "expected": case["expected"], "top3": sources[:3]})

    cut, cpu_cut = statistics.quantiles(latencies_ms, n=100), statistics.quantiles(cpu_ms, n=100)
    result = {
        "cases": len(cases),
        "documents": built.documents,
        "chunks": built.chunks,
        **{f"recall@{k}": round(hits[k] / len(cases), 4) for k in KS},
        "mrr@5": round(statistics.fmean(reciprocal_ranks), 4),
        "latency_ms": {"p50": round(cut[49], 2), "p95": round(cut[94], 2), "searches": len(latencies_ms)},
        "cpu_ms_per_search": {"p50": round(cpu_cut[49], 2), "p95": round(cpu_cut[94], 2)},
        "model_load_s": round(model_load_s, 2),
        "index_build_s": round(build_s, 2),
        "misses@3": misses,
        "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "misses@3"}, indent=2))
    print(f"misses@3: {[m['id'] for m in misses]}  → {args.out}")


if __name__ == "__main__":
    main()
