"""Shared fixtures: paths to the real Java Synthea samples in ../shared/data/synthea."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SYNTHEA = Path(os.environ.get("FEDERIMED_SHARED_DATA", REPO.parent / "shared" / "data" / "synthea"))


@pytest.fixture(scope="session")
def shared_synthea() -> Path:
    if not SHARED_SYNTHEA.is_dir():
        message = f"shared Synthea samples not found at {SHARED_SYNTHEA} (set FEDERIMED_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has them: a skip there would hide untested readers
        pytest.skip(message)
    return SHARED_SYNTHEA


@pytest.fixture(scope="session")
def ma_csv(shared_synthea: Path) -> Path:
    return shared_synthea / "ma-2025" / "csv"


@pytest.fixture(scope="session")
def ne_csv(shared_synthea: Path) -> Path:
    return shared_synthea / "ne-2023" / "csv"


@pytest.fixture(scope="session")
def ma_fhir(shared_synthea: Path) -> Path:
    return shared_synthea / "ma-2025" / "fhir"


@pytest.fixture(scope="module")
def base():
    """The default base model and tokenizer, loaded once per test module (LoRA wraps it in place)."""
    from federimed.config import ModelSettings
    from federimed.model import load_base

    return load_base(ModelSettings())


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower messages made in a test take their run and node ids from the process's task identity, which
    Flower's runtimes set."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
