"""The clinical comparison of issue 13: `federimed experiment`, timed, with the machine it ran on.

Run: `.venv/bin/python bench/clinical.py [--quick] [--workdir DIR] [--seeds 0,1,2] [--patients N] [--out NAME]`.
Writes bench/results/clinical.json: the number of pooled held-out cases, the seeds, every model's drug-F1
per seed, the paired differences with their 95 % intervals (federated − best local-only, − 0.9 ×
centralized, − base, − pooled counts; the external hospital; the DP model's cost), whether each goal
was met, the wall time of this invocation (`seconds`: stages done by an earlier one are skipped), each
stage's time when it ran (`stage_seconds`, whichever invocation ran it) and the CPU, and the report's plot
beside it (clinical.png). `--quick` writes clinical_quick.json instead (a smoke run);
`--out NAME` another file (a run with fewer seeds than the recorded one, say)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--workdir", type=Path, default=Path("experiment"))
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds [default: the experiment's]")
    parser.add_argument("--patients", type=int, default=None, help="patients per hospital [default: the experiment's]")
    parser.add_argument("--out", default=None,
                        help="file name under bench/results [default: clinical.json, clinical_quick.json with --quick]")
    args = parser.parse_args()

    from federimed.cpu import this_cpu

    argv = [sys.executable, "-m", "federimed.cli", "experiment", "--workdir", str(args.workdir)]
    argv += ["--quick"] if args.quick else []
    argv += ["--seeds", args.seeds] if args.seeds else []
    argv += ["--patients", str(args.patients)] if args.patients else []
    subprocess.run(argv, check=True)
    summary = json.loads((args.workdir / "report" / "experiment.json").read_text())
    result = summary | {
        "cpu": this_cpu().summary(),
        "cores": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = RESULTS / (args.out or ("clinical_quick.json" if args.quick else "clinical.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.copyfile(args.workdir / "report" / "experiment.png", out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
