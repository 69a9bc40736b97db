"""Which ingested hospital directory a ClientApp trains on, and checks that a directory is one.

Deployment: each SuperNode names its own directory with `--node-config "data-path=DIR"`; the server
never learns or chooses it. Simulation (virtual SuperNodes only know `partition-id`): the local
environment names it: `FEDERIMED_DATA_DIR` is the ingested data root and the optional
`FEDERIMED_HOSPITALS` (comma-separated names) picks hospitals; partition `i` trains on the i-th of them
in sorted order. `federimed train` sets both for its simulations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

DATA_PATH_KEY = "data-path"
OUTBOX_KEY = "outbox"
DATA_DIR_ENV = "FEDERIMED_DATA_DIR"
HOSPITALS_ENV = "FEDERIMED_HOSPITALS"
REQUIRED = ("manifest.json", "train.jsonl")


class HospitalDataError(ValueError):
    """A hospital directory is missing, empty or not ingested."""


def check_hospital(path: Path) -> Path:
    """Return `path` resolved if it is an ingested hospital directory, else raise a clear error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HospitalDataError(f"hospital data directory {path} does not exist")
    if not path.is_dir():
        raise HospitalDataError(f"hospital data path {path} is not a directory")
    if not any(path.iterdir()):
        raise HospitalDataError(f"hospital data directory {path} is empty: run `federimed ingest` first")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise HospitalDataError(
            f"{path} is not an ingested hospital directory: {', '.join(missing)} missing "
            "(run `federimed ingest` first)"
        )
    if (path / "train.jsonl").stat().st_size == 0:
        raise HospitalDataError(f"{path / 'train.jsonl'} holds no training dialogues")
    return path.resolve()


def ingested_hospitals(data_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The ingested hospital directories under `data_dir` (only `names`, when given), sorted by name."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise HospitalDataError(f"data directory {data_dir} does not exist")
    if names:
        return sorted((check_hospital(data_dir / name) for name in names), key=lambda p: p.name)
    found = sorted(p.resolve() for p in data_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file())
    if not found:
        raise HospitalDataError(f"no ingested hospital directory (with manifest.json) under {data_dir}")
    return [check_hospital(p) for p in found]


def node_hospital(node_config: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> Path:
    """The hospital directory of this node: `data-path` in deployment, else the simulation environment."""
    if DATA_PATH_KEY in node_config:
        return check_hospital(Path(str(node_config[DATA_PATH_KEY])))
    if DATA_DIR_ENV not in environ or "partition-id" not in node_config:
        raise HospitalDataError(
            f"this SuperNode has no hospital data: start it with --node-config \"{DATA_PATH_KEY}=DIR\" "
            f"(or, in a simulation, set {DATA_DIR_ENV})"
        )
    names = [n for n in environ.get(HOSPITALS_ENV, "").split(",") if n.strip()]
    hospitals = ingested_hospitals(Path(environ[DATA_DIR_ENV]), names)
    partition = int(node_config["partition-id"])  # type: ignore[arg-type]
    if partition >= len(hospitals):
        raise HospitalDataError(
            f"simulation partition {partition} has no hospital: {len(hospitals)} found under {environ[DATA_DIR_ENV]}"
        )
    return hospitals[partition]
