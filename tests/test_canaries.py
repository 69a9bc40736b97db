"""Memorisation audit: canary generation and planting, exposure maths and scoring, the report, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from dialogue_samples import dialogues
from fl_support import make_hospital, tiny_settings
from typer.testing import CliRunner

from federimed.checkpoints import new_run
from federimed.cli import app
from federimed.config import LoraSettings, TrainSettings
from federimed.memorisation.canaries import (
    COPIED_FILES,
    SECRET_DRUGS,
    CanaryError,
    CanarySet,
    hospital_dialogues,
    make_canaries,
    plant,
)
from federimed.memorisation.exposure import (
    Exposure,
    answer_log_likelihoods,
    exposure,
    greedy_answers,
    measure,
    rank,
    reproduces,
)
from federimed.memorisation.report import MARGIN_BITS, build_report, markdown, summarise
from federimed.training import batch_loss, collate, encode_dialogues

torch.set_num_threads(min(2, torch.get_num_threads()))

ANSWER = re.compile(r"^Start medications: ([a-z]+), ([a-z]+)\.\nProcedures: none\.\nCare plan: none\.$")


def _real() -> list[dict]:
    """Real-looking dialogues; one mentions a candidate condition and two candidate drugs."""
    rows = dialogues(12)
    rows[3]["messages"][1]["content"] += " Active conditions: Fabry disease."
    rows[5]["messages"][2]["content"] = "Started Miglustat 100 MG Oral Capsule and dapsone."
    return rows


def test_canaries_are_reproducible_and_seeded():
    first = make_canaries(_real(), seed=7)
    assert first == make_canaries(_real(), seed=7)
    assert first.canaries != make_canaries(_real(), seed=8).canaries
    assert [c.copies for c in first.canaries] == [1, 1, 4, 4, 16, 16, 0, 0, 0]


def test_canaries_never_collide_with_real_data():
    real = _real()
    canaries = make_canaries(real, copies=(1, 8), per_level=3, controls=4)
    assert {"Fabry disease", "miglustat", "dapsone"} <= set(canaries.excluded)
    text = "\n".join(m["content"].lower() for d in real for m in d["messages"])
    ids = {d["id"] for d in real}
    secrets, conditions = [], []
    for canary in canaries.canaries:
        assert canary.id not in ids
        for term in (canary.diagnosis, canary.history[0].split(" (")[0], *canary.secret):
            assert term.lower() not in text, term
        secrets += canary.secret
        conditions += [canary.diagnosis, canary.history[0]]
        assert canary.dialogue() not in real
    assert len(set(secrets)) == len(secrets), "no two canaries share a secret drug"
    assert len(set(conditions)) == len(conditions), "every canary is its own rare patient"
    assert len({json.dumps(c.prompt()) for c in canaries.canaries}) == len(canaries.canaries)


def test_too_few_candidates_is_a_clear_error():
    real = [dict(_real()[0], messages=[*_real()[0]["messages"][:2],
                                        {"role": "assistant", "content": " ".join(SECRET_DRUGS)}])]
    with pytest.raises(CanaryError, match="secret drugs that the data never mention"):
        make_canaries(real)


def test_alternatives_have_the_secret_format():
    canaries = make_canaries(_real(), seed=3)
    canary = canaries.planted[0]
    alternatives = canaries.alternatives(canary, 50)
    assert alternatives == canaries.alternatives(canary, 50), "seeded"
    assert len(set(alternatives)) == 50 and canary.secret not in alternatives
    assert all(len(a) == len(canary.secret) and set(a) <= set(canaries.pool) for a in alternatives)
    original = canary.dialogue()
    assert ANSWER.match(original["messages"][2]["content"]).groups() == canary.secret
    for alternative in alternatives:
        swapped = canary.dialogue(alternative)
        assert swapped["messages"][:2] == original["messages"][:2] == canary.prompt()
        assert ANSWER.match(swapped["messages"][2]["content"]).groups() == alternative
    with pytest.raises(CanaryError, match="alternatives"):
        canaries.alternatives(canary, len(canaries.pool) ** 2)


def test_canary_set_round_trips_through_json(tmp_path):
    canaries = make_canaries(_real())
    assert CanarySet.load(canaries.save(tmp_path / "canaries.json")) == canaries


def test_exposure_maths_on_hand_made_likelihoods():
    alternatives = [-10.0, -12.0, -11.0, -30.0, -9.5, -20.0, -15.0]  # N = 7
    assert rank(-1.0, alternatives) == 1
    assert exposure(-1.0, alternatives) == pytest.approx(math.log2(8))
    assert rank(-100.0, alternatives) == 8
    assert exposure(-100.0, alternatives) == pytest.approx(0.0)
    assert rank(-11.5, alternatives) == 4  # -9.5, -10, -11 are likelier
    assert exposure(-11.5, alternatives) == pytest.approx(math.log2(8) - 2)
    assert rank(-10.0, alternatives) == 2, "a tie does not outrank the secret"
    with pytest.raises(ValueError):
        exposure(-1.0, [])


def test_reproduces_needs_every_secret_drug_in_order():
    assert reproduces("Start medications: Miglustat, dapsone.\nProcedures: none.", ("miglustat", "dapsone"))
    assert not reproduces("Start medications: dapsone, miglustat.", ("miglustat", "dapsone"))
    assert not reproduces("Start medications: miglustat.", ("miglustat", "dapsone"))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_plant_copies_the_data_and_leaves_the_real_data_untouched(tmp_path):
    data = tmp_path / "hospitals"
    hospitals = [make_hospital(data, "alpha", 5), make_hospital(data, "beta", 4)]
    (hospitals[0] / ".salt").write_text("secret salt")
    before = _tree(data)
    canaries = make_canaries(hospital_dialogues(hospitals), copies=(1, 3), per_level=1, controls=2)
    copies = plant(canaries, hospitals, "alpha", tmp_path / "work")
    assert _tree(data) == before
    assert [c.name for c in copies] == ["alpha", "beta"]
    assert sorted(p.name for p in copies[0].iterdir()) == sorted(COPIED_FILES), "no salt, no targets"
    assert _tree(copies[1]) == _tree(hospitals[1])
    lines = [json.loads(line) for line in (copies[0] / "train.jsonl").read_text().splitlines()]
    assert lines[:5] == [json.loads(line) for line in (hospitals[0] / "train.jsonl").read_text().splitlines()]
    planted = lines[5:]
    assert len(planted) == 4 and len({row["id"] for row in planted}) == 4
    assert [row["messages"] for row in planted] == [canaries.planted[0].dialogue()["messages"]] + [
        canaries.planted[1].dialogue()["messages"]] * 3
    assert not any(c.secret[0] in (copies[1] / "train.jsonl").read_text() for c in canaries.canaries)
    with pytest.raises(CanaryError, match="not one of"):
        plant(canaries, hospitals, "gamma", tmp_path / "elsewhere")
    with pytest.raises(CanaryError, match="copy only"):
        plant(canaries, hospitals, "alpha", data)


def _exposures(values: list[tuple[int, float]]) -> list[Exposure]:
    return [Exposure(f"c{i}", k, 1, 63, e, -1.0) for i, (k, e) in enumerate(values)]


def test_summary_and_verdict_follow_the_exposures():
    quiet = _exposures([(1, 1.2), (16, 1.5), (0, 1.0), (0, 0.8)])
    summary = summarise(quiet, [""] * 4, [False] * 4)
    assert summary["mean_control"] == pytest.approx(0.9)
    assert summary["mean_planted_by_copies"] == {"1": 1.2, "16": 1.5}
    assert summary["verdict"].startswith("NO MEASURABLE MEMORISATION")
    loud = _exposures([(1, 1.2), (16, 0.9 + MARGIN_BITS + 0.1), (0, 1.0), (0, 0.8)])
    assert summarise(loud, [""] * 4, [False] * 4)["verdict"].startswith("MEMORISES")
    said = summarise(loud, [""] * 4, [False, True, False, False])
    assert said["regurgitated"] == 1 and said["verdict"].startswith("REGURGITATES")


def test_report_holds_every_canary_per_model(tmp_path):
    canaries = make_canaries(_real(), copies=(2,), per_level=1, controls=1)
    results = {
        "base": (_exposures([(2, 1.0), (0, 1.1)]), ["a", "b"], [False, False]),
        "no-dp": (_exposures([(2, 6.0), (0, 1.0)]), ["x", "y"], [True, False]),
    }
    meta = {"run": "r1", "hospital": "alpha", "settings_summary": "1 round",
            "model_notes": {"base": "no adapter", "no-dp": "run r1"}, "seconds": {"total": 3.0}}
    report = build_report(meta, canaries, results)
    assert [row["exposure"] for row in report["canaries"]] == [{"base": 1.0, "no-dp": 6.0}, {"base": 1.1, "no-dp": 1.0}]
    assert report["max_exposure"] == pytest.approx(6.0)
    assert report["models"]["no-dp"]["verdict"].startswith("REGURGITATES")
    text = markdown(report)
    assert "6.00 ✱" in text and canaries.planted[0].id in text and "REGURGITATES" in text


def test_cli_refuses_a_missing_run(tmp_path):
    runs = tmp_path / "runs"
    (runs / "20250101-000000-federated").mkdir(parents=True)
    (runs / "20250101-000000-federated" / "run.json").write_text("{}")
    result = CliRunner().invoke(app, ["audit-model", "--run", "nope", "--runs-dir", str(runs)])
    assert result.exit_code == 2
    assert "run 'nope' not found" in result.output and "20250101-000000-federated" in result.output
    result = CliRunner().invoke(app, ["audit-model", "--run", "x", "--runs-dir", str(runs), "--copies", "1,zero"])
    assert result.exit_code == 2 and "--copies" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hospital", "gamma"], "--hospital 'gamma' is not one of"),
        (["--dp-noise-multiplier", "0"], "invalid audit federation options"),
        (["--alternatives", "100000"], "alternatives"),
    ],
)
def test_cli_refuses_bad_requests_before_training(tmp_path, args, message):
    data = tmp_path / "hospitals"
    make_hospital(data, "alpha", 3)
    make_hospital(data, "beta", 3)
    run = new_run(tmp_path / "runs", tiny_settings(), "federated", {"alpha": 3, "beta": 3})
    before = _tree(data)
    result = CliRunner().invoke(app, ["audit-model", "--run", run.id, "--runs-dir", str(run.runs_dir),
                                      "--data", str(data), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (run.path / "audit").exists() and _tree(data) == before


@pytest.fixture(scope="module")
def tokenizer(base):
    return base[1]


def test_cached_prefix_scores_equal_whole_sequence_scores(base, tokenizer):
    canaries = make_canaries(_real())
    canary = canaries.canaries[0]
    rows = [canary.dialogue(), *(canary.dialogue(a) for a in canaries.alternatives(canary, 5))]
    scores = answer_log_likelihoods(base[0], tokenizer, rows, 256, batch_size=4)
    for example, score in zip(encode_dialogues(tokenizer, rows, 256), scores):
        loss, count = batch_loss(base[0].eval(), collate([example], 0, torch.device("cpu")))
        assert score == pytest.approx(-loss.item() * count, rel=1e-4, abs=1e-3)
    assert len(set(scores)) == len(scores)


@pytest.mark.slow
def test_a_repeated_canary_is_exposed_and_a_control_is_not(base, tokenizer):
    from federimed.model import add_lora
    from federimed.training import train_local

    canaries = make_canaries(dialogues(8), copies=(8,), per_level=1, controls=1, seed=1)
    planted, control = canaries.planted[0], canaries.controls[0]
    model = add_lora(base[0], LoraSettings(), seed=0)
    examples = encode_dialogues(tokenizer, [planted.dialogue()] * 8 + dialogues(8), 256)
    train_local(model, tokenizer, examples, TrainSettings(lr=3e-3, batch_size=4, seq_len=256), steps=10)
    found = {e.canary: e for e in measure(model, tokenizer, canaries, 31, 256, batch_size=16)}
    assert found[planted.id].exposure >= found[control.id].exposure + MARGIN_BITS, found
    assert found[planted.id].exposure >= 4.0, found
    answer = greedy_answers(model, tokenizer, [planted])[0]
    assert reproduces(answer, planted.secret), answer
