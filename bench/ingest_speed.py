"""FHIR ingest throughput: bare ``json.load`` of the bundles vs ``read_fhir`` of the same files.

    .venv/bin/python bench/ingest.py [--repeats 5] [--extra DIR ...]

Reads the ma-2025 Java Synthea bundles (and any extra folders of bundles, e.g. a `federimed synth`
hospital's fhir/), alternating the two measurements in each repeat so both see the same machine
load, and writes medians to bench/results/ingest.json. Acceptance: read_fhir reaches at least
50 % of json.load's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.synthea_fhir import INFO_PREFIXES, read_fhir  # noqa: E402

DEFAULT_SOURCE = (
    Path(os.environ.get("FEDERIMED_SHARED_DATA", REPO.parent / "shared" / "data" / "synthea")) / "ma-2025" / "fhir"
)
RESULTS = REPO / "bench" / "results" / "ingest.json"


def json_load_all(files: list[Path]) -> None:
    for path in files:
        with path.open("rb") as handle:
            json.load(handle)


def measure(name: str, files: list[Path], repeats: int) -> dict:
    """Median seconds, patients/s and MB/s of both readers over ``files``, and their ratio."""
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    patients = sum(not p.name.startswith(INFO_PREFIXES) for p in files)
    json_load_all(files)  # warm the page cache
    timings: dict[str, list[float]] = {"json.load": [], "read_fhir": []}
    for _ in range(repeats):
        start = time.perf_counter()
        json_load_all(files)
        timings["json.load"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = read_fhir(files)
        timings["read_fhir"].append(time.perf_counter() - start)
    if len(result.timelines) != patients or result.skipped:
        raise SystemExit(f"{name}: read {len(result.timelines)}/{patients} patients, {len(result.skipped)} skipped")
    readers = {}
    for reader, seconds in timings.items():
        median = statistics.median(seconds)
        readers[reader] = {
            "seconds_median": round(median, 4),
            "seconds_all": [round(s, 4) for s in seconds],
            "patients_per_s": round(patients / median, 1),
            "mb_per_s": round(megabytes / median, 1),
        }
    return {
        "source": name,
        "files": len(files),
        "patients": patients,
        "megabytes": round(megabytes, 2),
        "repeats": repeats,
        "readers": readers,
        "ratio_read_fhir_to_json_load": round(readers["read_fhir"]["mb_per_s"] / readers["json.load"]["mb_per_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of FHIR bundles")
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more folders of bundles")
    args = parser.parse_args()
    runs = []
    for folder in [args.source, *args.extra]:
        files = sorted(folder.glob("*.json"))
        if not files:
            raise SystemExit(f"{folder}: no .json files")
        runs.append(measure(f"{folder.parent.name}/{folder.name}", files, args.repeats))
    report = {
        "benchmark": "fhir-ingest",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews both readers
        },
        "acceptance": "read_fhir MB/s >= 0.5 x json.load MB/s",
        "parser": f"orjson {orjson.__version__}",
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"FHIR ingest (median of {args.repeats}) -> {RESULTS.relative_to(REPO)}")
    for column in ("source", "patients", "MB", "reader", "seconds", "patients/s", "MB/s", "ratio"):
        table.add_column(column, justify="left" if column in ("source", "reader") else "right")
    for run in runs:
        for reader, numbers in run["readers"].items():
            table.add_row(
                run["source"],
                str(run["patients"]),
                f"{run['megabytes']:.1f}",
                reader,
                f"{numbers['seconds_median']:.3f}",
                f"{numbers['patients_per_s']:.0f}",
                f"{numbers['mb_per_s']:.1f}",
                f"{run['ratio_read_fhir_to_json_load']:.2f}" if reader == "read_fhir" else "",
            )
    Console(width=max(Console().width, 100)).print(table)


if __name__ == "__main__":
    main()
