"""Which model the chat and `federimed ask` serve by default, and how the chat's model menu names them.

The demo trains the federated model first and its baselines after it: the newest checkpoint is then a
baseline, and doctors must still be served the federated model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from federimed.assistant import Assistant
from federimed.chat_ui import AppSettings, version_menu
from federimed.checkpoints import new_run, save_round
from federimed.config import RunSettings

STATE = {"w": torch.zeros(2)}


@pytest.fixture
def demo_runs(tmp_path: Path) -> dict[str, str]:
    """A federated run of two rounds, then a local-only and a centralized baseline created after it."""
    federated = new_run(tmp_path, RunSettings(), "federated", {"childrens": 10, "general": 20})
    save_round(federated, 1, STATE, {})
    save_round(federated, 2, STATE, {})
    time.sleep(1.1)  # run ids and creation times have whole seconds: the baselines are strictly newer
    local = new_run(tmp_path, RunSettings(), "local-only", {"general": 20})
    save_round(local, 2, STATE, {})
    central = new_run(tmp_path, RunSettings(), "centralized", {"childrens": 10, "general": 20})
    save_round(central, 2, STATE, {})
    return {"federated": f"{federated.id}/round-2", "local": f"{local.id}/round-2", "central": f"{central.id}/round-2"}


def test_chat_and_ask_serve_the_federated_model_when_baselines_are_newer(tmp_path: Path, demo_runs) -> None:
    menu = version_menu(tmp_path)
    assert menu.default == demo_runs["federated"]
    ask = Assistant(adapter="latest", runs_dir=tmp_path, retrieval=False)  # what `federimed ask` does
    assert ask.version.label == menu.default


def test_the_menu_offers_models_for_care_and_marks_the_default(tmp_path: Path, demo_runs) -> None:
    menu = version_menu(tmp_path)
    assert list(menu.items.values()) == [demo_runs["federated"], f"{demo_runs['federated'][:-1]}1", "base"]
    default_label = next(label for label, spec in menu.items.items() if spec == menu.default)
    assert default_label.startswith("Federated · round 2 · 2 hospitals (childrens, general) · ")
    assert default_label.endswith("(default)")
    assert sum(label.endswith("(default)") for label in menu.items) == 1
    assert list(menu.items)[-1] == "Base model (not fine-tuned)"


def test_evaluators_can_ask_for_the_baselines(tmp_path: Path, demo_runs) -> None:
    menu = version_menu(tmp_path, baselines=True)
    assert {demo_runs["local"], demo_runs["central"]} <= set(menu.items.values())
    assert menu.default == demo_runs["federated"]
    labels = {spec: label for label, spec in menu.items.items()}
    assert labels[demo_runs["local"]].startswith("Evaluation baseline: local-only · round 2 · 1 hospital (general)")
    assert labels[demo_runs["central"]].startswith("Evaluation baseline: centralized")


def test_without_a_federated_run_the_base_model_answers(tmp_path: Path) -> None:
    local = new_run(tmp_path, RunSettings(), "local-only", {"general": 20})
    save_round(local, 1, STATE, {})
    menu = version_menu(tmp_path)
    assert menu.default == "base" and list(menu.items.values()) == ["base"]
    assert "No federated run" in (Assistant(adapter="latest", runs_dir=tmp_path, retrieval=False).notice or "")


def test_the_chat_offers_baselines_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDERIMED_CHAT_BASELINES", raising=False)
    assert AppSettings.from_env().baselines is False
    monkeypatch.setenv("FEDERIMED_CHAT_BASELINES", "1")
    assert AppSettings.from_env().baselines is True


def test_a_broken_latest_link_is_an_error_not_a_silent_base_model(tmp_path: Path, demo_runs) -> None:
    from federimed.checkpoints import CheckpointError

    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to("no-such-run/round-9")
    with pytest.raises(CheckpointError):
        Assistant(adapter="latest", runs_dir=tmp_path, retrieval=False)
