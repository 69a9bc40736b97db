"""The assistant: de-identification of pasted cases and uploaded bundles, prompt assembly, retrieval,
streaming with the real default model, model versions and input limits."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

import pytest
from chat_support import build_tiny_index

from federimed.assistant import (
    MAX_CASE_CHARS,
    Assistant,
    CaseError,
    build_prompt,
    resolve_version,
    retrieval_query,
)
from federimed.checkpoints import CheckpointError, new_run, save_round
from federimed.config import RunSettings
from federimed.retrieval import Snippet
from federimed.scrub import scrub_free_text
from ingest.audit import Matcher, collect_identifiers
from ingest.cases import Snapshot
from ingest.dialogues import SYSTEM_PROMPT, case_prompt, snapshot_text
from ingest.synthea_fhir import read_fhir

TODAY = date(2026, 1, 1)
PLANTED = """Name: Jonathan Quimby
DOB: 1961-03-14
SSN 123-45-6789, phone (617) 555-0142, e-mail jq.patient@example.org
Address: 12 Elm Street, Springfield
MRN: 99812734
Seen on 2025-11-02 by Dr. Abernathy for chest tightness; his 95-year-old father had an MI.
New diagnosis: Essential hypertension
Recent findings: BP 152/96 mmHg; HbA1c 6.1 %"""
PLANTED_IDENTIFIERS = [
    "Jonathan", "Quimby", "1961", "123-45-6789", "555-0142", "jq.patient@example.org", "Elm Street",
    "Springfield", "99812734", "2025-11-02", "Abernathy", "95",
]  # fmt: skip
HYPERTENSION = (
    "Patient: 58-year-old male\nNew diagnosis: Essential hypertension\nActive conditions: none\n"
    "Current medications: none\nAllergies: none\nRecent findings: BP 152/96 mmHg"
)


def snippet(n: int) -> Snippet:
    return Snippet(f"Passage {n} text.", f"Guideline {n}", f"Section {n}", f"doc{n}.md", "", "own words", 0.5)


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("guidelines"))


@pytest.fixture(scope="module")
def base_assistant(tiny_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Assistant:
    return Assistant(adapter="base", runs_dir=tmp_path_factory.mktemp("runs"), index_dir=tiny_index)


def patient_bundle(ma_fhir: Path) -> Path:
    return next(
        p for p in sorted(ma_fhir.glob("*.json"))
        if not p.name.startswith(("hospitalInformation", "practitionerInformation"))
    )  # fmt: skip


# ------------------------------------------------------------------ de-identification and prompt


def test_scrub_removes_planted_identifiers_and_keeps_the_clinical_facts() -> None:
    text = scrub_free_text(PLANTED, today=TODAY)
    for value in PLANTED_IDENTIFIERS:
        assert value not in text, f"{value!r} survived scrubbing"
    for kept in ("Essential hypertension", "BP 152/96 mmHg", "HbA1c 6.1 %", "chest tightness"):
        assert kept in text
    assert "(age 64)" in text, "a birth date becomes an age"
    assert "2 months ago" in text, "an exact date becomes a relative time"
    assert "90+-year-old" in text, "ages over 89 are grouped"


def test_scrub_redacts_only_the_labelled_value_in_a_one_line_paste() -> None:
    text = scrub_free_text("Name: John Doe, MRN: 4471-22. New diagnosis: Streptococcal sore throat; fever 38.9", TODAY)
    assert "John" not in text and "Doe" not in text and "4471-22" not in text
    assert "New diagnosis: Streptococcal sore throat; fever 38.9" in text


def test_prompt_numbers_snippets_and_keeps_the_fine_tuned_format() -> None:
    snapshot = Snapshot("58", "50-59", "male", None, ["Essential hypertension"], [], [], [], ["BP 152/96 mmHg"])
    assert build_prompt(snapshot_text(snapshot), []) == case_prompt(snapshot)

    messages = build_prompt(scrub_free_text(PLANTED, today=TODAY), [snippet(1), snippet(2)])
    system, user = messages[0]["content"], messages[1]["content"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert system.startswith(SYSTEM_PROMPT)
    assert "[1] Guideline 1 — Section 1: Passage 1 text." in system
    assert "[2] Guideline 2 — Section 2: Passage 2 text." in system
    assert system.index("[1]") < system.index("[2]")
    assert user.endswith("Question: What treatment should be started?")
    for value in PLANTED_IDENTIFIERS:
        assert value not in system + user


def test_long_snippets_are_cut_for_the_small_model() -> None:
    long = Snippet("word " * 400, "T", "S", "t.md", "", "own words", 0.5)
    system = build_prompt("New diagnosis: Asthma", [long])[0]["content"]
    assert len(system) < len(SYSTEM_PROMPT) + 600
    assert system.rstrip().endswith("…")


def test_retrieval_query_prefers_the_new_diagnosis() -> None:
    assert retrieval_query(HYPERTENSION) == "First-line treatment of Essential hypertension"
    assert retrieval_query("Cough for 3 weeks\nQuestion: what now?") == "Cough for 3 weeks"


def test_uploaded_bundle_reaches_the_prompt_de_identified(base_assistant: Assistant, ma_fhir: Path) -> None:
    bundle = patient_bundle(ma_fhir)
    matcher = Matcher(collect_identifiers([read_fhir([bundle])]))
    for case in (bundle, bundle.read_bytes()):
        prepared = base_assistant.prepare(case, retrieval=True)
        assert prepared.case_text.startswith("Patient: ")
        assert prepared.snippets, "a real case finds guideline passages"
        for message in prepared.messages:
            for line in message["content"].splitlines():
                assert matcher.find(line) == [], f"identifier in the {message['role']} prompt"


def test_bad_bundle_is_a_clear_error(base_assistant: Assistant) -> None:
    with pytest.raises(CaseError, match="uploaded bundle"):
        base_assistant.prepare(b'{"resourceType": "Bundle", "entry": []}')


# ------------------------------------------------------------------ retrieval switch and limits


def test_retrieval_finds_the_matching_guideline(base_assistant: Assistant) -> None:
    prepared = base_assistant.prepare(HYPERTENSION, retrieval=True)
    assert prepared.snippets[0].title == "Hypertension in adults"
    assert "[1] Hypertension in adults" in prepared.messages[0]["content"]


def test_retrieval_off_means_no_snippets(base_assistant: Assistant) -> None:
    prepared = base_assistant.prepare(HYPERTENSION, retrieval=False)
    assert prepared.snippets == []
    assert prepared.messages[0]["content"] == SYSTEM_PROMPT


def test_empty_or_oversized_case_is_refused(base_assistant: Assistant) -> None:
    with pytest.raises(CaseError, match="empty"):
        base_assistant.prepare("   \n ")
    with pytest.raises(CaseError, match=f"limit is {MAX_CASE_CHARS:,}"):
        base_assistant.prepare("cough " * (MAX_CASE_CHARS // 5))


# ------------------------------------------------------------------ model versions


def test_latest_without_runs_falls_back_to_base(tmp_path: Path) -> None:
    version, notice = resolve_version("latest", tmp_path / "runs")
    assert version.adapter_dir is None and version.label == "base"
    assert notice and "base model" in notice
    with pytest.raises(CheckpointError, match="not found"):
        resolve_version("no-such-run", tmp_path / "runs")


def test_versions_describe_the_federated_training(tmp_path: Path) -> None:
    import torch

    run = new_run(tmp_path, RunSettings(), "federated", {"north": 120, "south": 80})
    save_round(run, 1, {"w": torch.zeros(2)}, {"train_loss": 1.0})
    round_dir = save_round(run, 2, {"w": torch.zeros(2)}, {"train_loss": 0.5})
    version, notice = resolve_version("latest", tmp_path)
    assert notice is None
    assert version.adapter_dir == round_dir.resolve()
    assert version.label == f"{run.id}/round-2"
    described = version.describe()
    for part in ("federated", "2 rounds", "2 hospitals (north, south)", "200 training examples"):
        assert part in described
    assert resolve_version(f"{run.id}/round-1", tmp_path)[0].rounds == 1


# ------------------------------------------------------------------ generation with the real default model


@pytest.mark.slow
def test_stream_yields_tokens_that_join_into_the_answer(base_assistant: Assistant) -> None:
    pieces = list(base_assistant.stream(HYPERTENSION, retrieval=False, max_new_tokens=12))
    assert len(pieces) >= 3 and all(isinstance(p, str) for p in pieces)
    answer = base_assistant.answer(HYPERTENSION, retrieval=False, max_new_tokens=12)
    assert "".join(pieces) == answer.text, "greedy decoding is deterministic"
    assert answer.snippets == [] and answer.model_version.label == "base"

    async def collect() -> list[str]:
        prepared = base_assistant.prepare(HYPERTENSION, retrieval=False)
        return [p async for p in base_assistant.astream(prepared, max_new_tokens=12)]

    assert "".join(asyncio.run(collect())) == answer.text


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_refused(base_assistant: Assistant) -> None:
    prepared = base_assistant.prepare(HYPERTENSION, retrieval=False)
    with pytest.raises(CaseError, match="the model reads at most"):
        next(base_assistant.generate(prepared, max_new_tokens=10**6))
