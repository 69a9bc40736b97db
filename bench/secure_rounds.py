"""Round time with and without secure aggregation (SecAgg+) and TLS, on loopback.

    nice -n 19 .venv/bin/python bench/secure_rounds.py [--data data/hospitals] [--rounds 2] [--local-steps 2]
        [--batch-size 4] [--seq-len 192] [--configs plain,secagg,tls,tls+secagg]

Each configuration runs one federation the way `federimed train` does (SuperLink + one SuperNode per
hospital + `flwr run`, `federate_on_loopback`) with the same hospitals and settings, one after another.
Per round: wall time from the first training instruction to the last held-out score (`seconds` in
metrics.json), the hospitals' own training seconds, and the bytes each hospital uploaded (SecAgg+: the
masked vector). Round 1 includes every ClientApp's first model load; later rounds are the steady state.
SecAgg+ adds three protocol stages per round (each a ClientApp start on every SuperNode) and its
key agreement, masking and unmasking; TLS encrypts every connection.
Hospitals: the ingested ones under --data; when there are fewer than two, the shared Synthea samples.
The machine is shared: the load average before and after each configuration is recorded with it.
Writes bench/results/secagg.json.
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
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = ("plain", "secagg", "tls", "tls+secagg")


def run_config(name: str, settings, found: list[Path], scratch: Path) -> dict:
    """One federation with `name`'s protections; its per-round wall time, training time and upload bytes."""
    from federimed.fl.deployment import federate_on_loopback
    from federimed.fl.settings import ServerOptions
    from federimed.security.certs import create_tls

    parts = set(name.split("+"))
    tls = create_tls(scratch / name / "tls") if "tls" in parts else None
    options = ServerOptions(
        settings=settings, hospitals=len(found), runs_dir=scratch / name / "runs", secagg="secagg" in parts,
    )
    rounds: list[dict] = []
    load_before = os.getloadavg()
    began = time.perf_counter()
    federate_on_loopback(found, options, REPO, rounds.append, tls=tls)
    total = time.perf_counter() - began
    return {
        "secagg": "secagg" in parts,
        "tls": tls is not None,
        "round_wall_s": [entry["seconds"] for entry in rounds],
        "mean_train_s": [statistics.mean(h["seconds"] for h in entry["hospitals"].values()) for entry in rounds],
        "upload_bytes_per_hospital": [
            statistics.mean(h["bytes_received"] for h in entry["hospitals"].values()) for entry in rounds
        ],
        "heldout_loss": [entry["heldout_loss"] for entry in rounds],
        "total_wall_s_including_startup": total,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def overheads(results: dict[str, dict]) -> dict[str, dict]:
    """Extra seconds per round of each configuration over `plain`: round 1 and the mean of later rounds."""
    if "plain" not in results:
        return {}
    base = results["plain"]["round_wall_s"]
    found = {}
    for name, result in results.items():
        if name == "plain":
            continue
        walls = result["round_wall_s"]
        later = [w - b for w, b in zip(walls[1:], base[1:], strict=False)]
        found[name] = {
            "round_1_extra_s": walls[0] - base[0],
            "later_rounds_extra_s": statistics.mean(later) if later else None,
            "later_rounds_ratio": (statistics.mean(walls[1:]) / statistics.mean(base[1:])) if later else None,
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "hospitals")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "secagg.json")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")

    sys.path.insert(0, str(REPO / "bench"))
    from federated import hospitals

    from federimed.config import RunSettings, TrainSettings
    from federimed.fl.settings import ServerOptions

    train = TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len)
    settings = RunSettings(rounds=args.rounds, train=train)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="federimed-secagg-bench-") as scratch:
        found = hospitals(args.data, Path(scratch) / "data")
        for name in names:
            results[name] = run_config(name, settings, found, Path(scratch))
            print(f"{name}: round wall s {[round(s, 1) for s in results[name]['round_wall_s']]}, "
                  f"train s {[round(s, 1) for s in results[name]['mean_train_s']]}", flush=True)
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "nice": os.nice(0),
                    "load_average_end": os.getloadavg()},
        "settings": settings.model_dump(mode="json"),
        "hospitals": [h.name for h in found],
        "secagg_options": {k: f.default for k, f in ServerOptions.model_fields.items() if k.startswith("secagg_")},
        "configs": results,
        "overhead_vs_plain": overheads(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
