"""The fast CPU path: GGUF LoRA export (layout, cache), llama.cpp against the transformers reference
(logits, greedy answers, recommended drugs), engine choice, the `export` command and the fallback."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from dialogue_samples import TREATMENTS, dialogues
from typer.testing import CliRunner

from federimed.assistant import Assistant, Prepared
from federimed.checkpoints import ADAPTER_WEIGHTS, new_run, save_round
from federimed.config import LoraSettings, ModelSettings, RunSettings, TrainSettings
from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.metrics import set_scores
from federimed.evaluation.runner import generate_batch
from federimed.model import add_lora, load_base, load_for_inference, resolve_base
from federimed.serving import gguf_lora, select
from federimed.serving.backend import TransformersEngine, prompt_ids
from federimed.serving.gguf_lora import (
    ensure_served,
    permute_rows,
    shipped_base,
    stored_fingerprint,
)
from federimed.serving.requantise import served_copy
from federimed.training import encode_dialogues, train_local

torch.set_num_threads(min(2, torch.get_num_threads()))

LLAMA_PROBLEM = select.llama_cpp_problem()
needs_llama = pytest.mark.skipif(
    LLAMA_PROBLEM is not None, reason=f"fast engine not installed ({LLAMA_PROBLEM}); scripts/setup.sh installs it"
)
SETTINGS = ModelSettings()
BASE_GGUF, HF_DIR = shipped_base(SETTINGS)  # adapters are exported for the shipped base
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUESTIONS = [
    "A 58-year-old patient. New diagnosis: essential hypertension. What was started?",
    "A 47-year-old patient. New diagnosis: type 2 diabetes mellitus. What was started?",
    "A 12-year-old patient. New diagnosis: streptococcal sore throat. What was started?",
]


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": dialogues(1)[0]["messages"][0]["content"]}, {"role": "user", "content": question}]


def save_adapter(runs_dir: Path, peft_model: torch.nn.Module) -> Path:
    run = new_run(runs_dir, RunSettings(), "federated", {"north": 8, "south": 8})
    return save_round(run, 1, peft_model, {"train_loss": 1.0})


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose lora_B matrices are random (PEFT starts them at zero), on every linear layer."""
    model, _ = load_base(SETTINGS)
    peft_model = add_lora(model, LoraSettings())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return save_adapter(tmp_path_factory.mktemp("random-runs"), peft_model)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for a few steps to name the drug that was started."""
    model, tokenizer = load_base(SETTINGS)
    peft_model = add_lora(model, LoraSettings())
    train = TrainSettings(local_steps=24, batch_size=4, seq_len=96, lr=3e-3)
    train_local(peft_model, tokenizer, encode_dialogues(tokenizer, dialogues(48), train.seq_len), train)
    return save_adapter(tmp_path_factory.mktemp("trained-runs"), peft_model)


def reference_logits(adapter_dir: Path | None, prompts: list[list[int]]) -> list[np.ndarray]:
    model, _ = load_for_inference(SETTINGS, adapter_dir)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]


# ------------------------------------------------------------------ export (no llama.cpp needed)


def test_permutation_maps_hugging_face_q_k_rows_to_the_gguf_layout() -> None:
    """The de-quantised HF weights, row-permuted, equal the GGUF's own q/k weights: the same permutation
    must apply to lora_B."""
    model, _ = load_base(SETTINGS)
    reader = gguf.GGUFReader(resolve_base(SETTINGS))
    tensors = {t.name: t for t in reader.tensors}
    attention = model.model.layers[3].self_attn
    for name, hf_weight, heads in (("blk.3.attn_q.weight", attention.q_proj.weight, 9), ("blk.3.attn_k.weight", attention.k_proj.weight, 3)):
        tensor = tensors[name]
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(hf_weight.shape)
        hf = hf_weight.detach().numpy()
        assert not np.allclose(hf, stored), "q/k rows are stored permuted in the GGUF"
        np.testing.assert_allclose(permute_rows(hf, heads), stored, atol=1e-6)


def test_served_base_re_encodes_4_bit_tensors_as_q8_0_once(tmp_path: Path) -> None:
    """For the chat, Q4_1 tensors come back as Q8_0 holding the same weights to within Q8_0's step;
    everything else (metadata, other tensors) unchanged; a second call reuses the copy."""
    source = resolve_base(SETTINGS)
    served = served_copy(source, tmp_path, "q8_0")
    assert served.name.endswith(".Q8_0.gguf") and served.parent == tmp_path
    original, copy = gguf.GGUFReader(source), gguf.GGUFReader(served)
    assert {n: f.contents() for n, f in original.fields.items() if not n.startswith("GGUF.")} == {
        n: f.contents() for n, f in copy.fields.items() if not n.startswith("GGUF.")
    }
    recoded = 0
    for before, after in zip(original.tensors, copy.tensors, strict=True):
        assert (before.name, list(before.shape)) == (after.name, list(after.shape))
        if before.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            assert after.tensor_type == gguf.GGMLQuantizationType.Q8_0
            weights = gguf.quants.dequantize(before.data, before.tensor_type)
            blocks = np.abs(weights).reshape(-1, 32).max(axis=1, keepdims=True)
            error = np.abs(gguf.quants.dequantize(after.data, after.tensor_type) - weights).reshape(-1, 32)
            assert (error <= 0.6 * blocks / 127).all()  # half a step, plus the fp16 rounding of the scale
            recoded += 1
        else:
            assert after.tensor_type == before.tensor_type
            assert np.array_equal(np.asarray(after.data), np.asarray(before.data))
    assert recoded == 210
    written = served.stat().st_mtime_ns
    assert served_copy(source, tmp_path, "q8_0") == served and served.stat().st_mtime_ns == written


def test_served_base_for_evaluation_holds_every_weight_in_f16(tmp_path: Path) -> None:
    """For evaluation, every quantised tensor comes back as F16: its de-quantised weights, rounded once."""
    source = resolve_base(SETTINGS)
    served = served_copy(source, tmp_path, "f16")
    assert served.name.endswith(".F16.gguf")
    original, copy = gguf.GGUFReader(source), gguf.GGUFReader(served)
    converted = 0
    for before, after in zip(original.tensors, copy.tensors, strict=True):
        assert (before.name, list(before.shape)) == (after.name, list(after.shape))
        if before.tensor_type == gguf.GGMLQuantizationType.F32:
            assert after.tensor_type == before.tensor_type and np.array_equal(np.asarray(after.data), np.asarray(before.data))
            continue
        assert after.tensor_type == gguf.GGMLQuantizationType.F16
        weights = gguf.quants.dequantize(before.data, before.tensor_type).reshape(-1)
        np.testing.assert_allclose(np.asarray(after.data, dtype=np.float32).reshape(-1), weights, rtol=2**-11, atol=2**-24)
        converted += 1
    assert converted == 211  # 210 Q4_1 tensors and the Q8_0 token embedding


def test_export_writes_llama_cpp_adapter_layout(random_adapter: Path) -> None:
    path, rebuilt = ensure_served(random_adapter, BASE_GGUF, HF_DIR)
    assert rebuilt and path == random_adapter / "adapter.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 30 * len(MODULES) * 2
    from safetensors.torch import load_file

    peft = load_file(random_adapter / ADAPTER_WEIGHTS)
    prefix = "base_model.model.model.layers.5"
    q_b = peft[f"{prefix}.self_attn.q_proj.lora_B.weight"].numpy()
    stored_q_b = np.asarray(tensors["blk.5.attn_q.weight.lora_b"].data)
    np.testing.assert_array_equal(stored_q_b, permute_rows(q_b, 9))
    assert not np.array_equal(stored_q_b, q_b)
    v_b = peft[f"{prefix}.self_attn.v_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.5.attn_v.weight.lora_b"].data), v_b)
    down_a = peft[f"{prefix}.mlp.down_proj.lora_A.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.5.ffn_down.weight.lora_a"].data), down_a)


def test_export_is_cached_and_rebuilt_when_the_checkpoint_changes(random_adapter: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "round-1"
    shutil.copytree(random_adapter, checkpoint, ignore=shutil.ignore_patterns("adapter.gguf"))
    path, rebuilt = ensure_served(checkpoint, BASE_GGUF, HF_DIR)
    first = stored_fingerprint(path)
    assert rebuilt and first
    mtime = path.stat().st_mtime_ns
    assert ensure_served(checkpoint, BASE_GGUF, HF_DIR) == (path, False)
    assert path.stat().st_mtime_ns == mtime, "an up-to-date export is reused, not rewritten"

    state = load_file(checkpoint / ADAPTER_WEIGHTS)
    key = next(k for k in state if "lora_B" in k)
    state[key] = state[key] + 0.5
    save_file(state, checkpoint / ADAPTER_WEIGHTS, {"format": "pt"})
    assert ensure_served(checkpoint, BASE_GGUF, HF_DIR) == (path, True)
    assert stored_fingerprint(path) not in (None, first)
    assert ensure_served(checkpoint, BASE_GGUF, HF_DIR, force=True)[1]

    checkpoint.chmod(0o555)  # a read-only checkpoint is served from the cache instead
    try:
        cached, _ = ensure_served(checkpoint, BASE_GGUF, HF_DIR)
    finally:
        checkpoint.chmod(0o755)
    if cached.parent != checkpoint:  # root may write anyway
        assert stored_fingerprint(cached) == stored_fingerprint(path)


def test_unservable_adapters_are_refused_with_the_reason(random_adapter: Path, tmp_path: Path) -> None:
    import json
    import shutil

    checkpoint = tmp_path / "dora"
    shutil.copytree(random_adapter, checkpoint)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(gguf_lora.ExportError, match="use_dora"):
        ensure_served(checkpoint, BASE_GGUF, HF_DIR)
    with pytest.raises(gguf_lora.ExportError, match="is not a PEFT checkpoint"):
        ensure_served(tmp_path, BASE_GGUF, HF_DIR)


def test_export_command_writes_then_reuses(random_adapter: Path) -> None:
    from federimed.cli import app

    runs_dir = random_adapter.parent.parent
    run_id = random_adapter.parent.name
    (random_adapter / "adapter.gguf").unlink(missing_ok=True)
    runner = CliRunner()
    first = runner.invoke(app, ["export", "--run", run_id, "--round", "1", "--format", "gguf", "--runs-dir", str(runs_dir)])
    assert first.exit_code == 0, first.output
    assert "exported" in first.output and (random_adapter / "adapter.gguf").is_file()
    again = runner.invoke(app, ["export", "--run", run_id, "--runs-dir", str(runs_dir)])
    assert again.exit_code == 0 and "up to date" in again.output
    missing = runner.invoke(app, ["export", "--run", run_id, "--round", "9", "--runs-dir", str(runs_dir)])
    assert missing.exit_code == 1 and "round-9" in missing.output
    bad = runner.invoke(app, ["export", "--run", run_id, "--format", "onnx", "--runs-dir", str(runs_dir)])
    assert bad.exit_code != 0 and "gguf" in bad.output


# ------------------------------------------------------------------ engine choice and fallback


def test_engine_choice_follows_model_device_and_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(select.ENGINE_ENV, raising=False)
    assert select.choose_engine(ModelSettings(base="HuggingFaceTB/SmolLM2-135M-Instruct")) == ("transformers", None)
    assert select.choose_engine(SETTINGS, "transformers") == ("transformers", None)
    monkeypatch.setenv(select.ENGINE_ENV, "onnx")
    with pytest.raises(ValueError, match="FEDERIMED_ENGINE"):
        select.choose_engine(SETTINGS)
    monkeypatch.delenv(select.ENGINE_ENV)
    if LLAMA_PROBLEM is None:
        assert select.choose_engine(SETTINGS) == ("llama.cpp", None)


@pytest.mark.slow
def test_without_llama_cpp_the_assistant_warns_once_and_still_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv(select.ENGINE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    select.llama_cpp_problem.cache_clear()
    select._warn_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=select.__name__):
            assistant = Assistant(adapter="base", runs_dir=tmp_path, retrieval=False)
            Assistant(adapter="base", runs_dir=tmp_path, retrieval=False)
        assert assistant.engine == "transformers"
        assert assistant.notice and "Fast CPU inference is unavailable" in assistant.notice
        assert "federimed[fast]" in assistant.notice
        warnings = [r for r in caplog.records if "Fast CPU inference is unavailable" in r.getMessage()]
        assert len(warnings) == 1, "one warning per process, not one per answer"
        answer = assistant.answer("New diagnosis: essential hypertension", max_new_tokens=6)
        assert answer.text.strip()
        assert assistant.model().name == "transformers"
        with pytest.raises(Exception, match="llama.cpp engine was asked for"):
            select.choose_engine(SETTINGS, "llama.cpp")
    finally:
        select.llama_cpp_problem.cache_clear()
        select._warn_once.cache_clear()


# ------------------------------------------------------------------ llama.cpp against the reference


@needs_llama
@pytest.mark.slow
def test_fast_logits_match_the_reference_with_and_without_an_adapter(
    random_adapter: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base_engine = select.load_engine(SETTINGS, None, "llama.cpp", purpose="evaluation")
    prompts = [prompt_ids(base_engine.tokenizer, messages(q)) for q in QUESTIONS]
    fast_base = [base_engine.last_logits(ids) for ids in prompts]
    base_engine.close()
    fast_lora_engine = select.load_engine(SETTINGS, random_adapter, "llama.cpp", purpose="evaluation")
    fast_lora = [fast_lora_engine.last_logits(ids) for ids in prompts]
    fast_lora_engine.close()
    ref_base = reference_logits(None, prompts)
    ref_lora = reference_logits(random_adapter, prompts)

    def gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b))

    adapter_effect = gap(ref_lora, ref_base)
    assert adapter_effect > 0.08, "the random adapter must change the logits for this test to mean anything"
    assert gap(fast_base, ref_base) < 0.05, "llama.cpp (F16 copy) stays close to the de-quantised reference"
    assert gap(fast_lora, ref_lora) < 0.05
    assert gap(fast_lora, ref_lora) < adapter_effect / 3
    for fast, ref in zip(fast_base + fast_lora, ref_base + ref_lora):
        assert int(fast.argmax()) == int(ref.argmax())

    # Without the q/k row permutation the adapter lands on the wrong rotary dimensions.
    monkeypatch.setattr(gguf_lora, "permute_rows", lambda weight, heads: weight)
    unpermuted_dir = tmp_path / "round-1"
    import shutil

    shutil.copytree(random_adapter, unpermuted_dir, ignore=shutil.ignore_patterns("adapter.gguf"))
    wrong = select.load_engine(SETTINGS, unpermuted_dir, "llama.cpp", purpose="evaluation")
    wrong_logits = [wrong.last_logits(ids) for ids in prompts]
    wrong.close()
    assert gap(wrong_logits, ref_lora) > 2 * gap(fast_lora, ref_lora)


@needs_llama
@pytest.mark.slow
def test_fast_greedy_answers_agree_with_the_reference_in_recommended_drugs(trained_adapter: Path) -> None:
    """Evaluation (F16 throughout, also the chat's greedy path) gives the reference's drugs (goal 0.95); a
    single stream, whose answer the Q8_0 copy decodes after the F16 copy has read the prompt (sampled chat
    answers), comes close."""
    vocab = DrugVocabulary.with_common_brands()
    for description in TREATMENTS.values():
        vocab.add_description(description)
    cases = [messages(d["messages"][1]["content"]) for d in dialogues(8, start=200)]
    for adapter in (trained_adapter, None):
        reference = generate_batch(TransformersEngine(*load_for_inference(SETTINGS, adapter)), cases, max_new_tokens=24, batch_size=4)
        if adapter:
            assert sum(bool(vocab.extract(a)) for a in reference) >= len(cases) // 2, "the trained adapter names drugs"
        evaluation = select.load_engine(SETTINGS, adapter, "llama.cpp", purpose="evaluation")
        assert evaluation.name == "llama.cpp" and evaluation.adapter_gguf == (adapter / "adapter.gguf" if adapter else None)
        chat = select.load_engine(SETTINGS, adapter, "llama.cpp", purpose="chat")
        for goal, answers in (
            (0.95, generate_batch(evaluation, cases, max_new_tokens=24)),
            (0.85, ["".join(chat.stream(prompt_ids(chat.tokenizer, c), max_new_tokens=24, temperature=0.0)).strip() for c in cases]),
        ):
            f1 = [set_scores(vocab.extract(f), vocab.extract(r)).f1 for f, r in zip(answers, reference)]
            assert sum(f1) / len(f1) >= goal, list(zip(reference, answers))
        evaluation.close()
        chat.close()


@needs_llama
@pytest.mark.slow
def test_batched_greedy_decoding_gives_the_answers_of_one_at_a_time(trained_adapter: Path) -> None:
    engine = select.load_engine(SETTINGS, trained_adapter, "llama.cpp", purpose="evaluation")
    prompts = [prompt_ids(engine.tokenizer, messages(d["messages"][1]["content"])) for d in dialogues(6, start=200)]
    one_by_one = [list(engine.tokens(p, max_new_tokens=24)) for p in prompts]
    ticks: list[int] = []
    assert engine.greedy(prompts, max_new_tokens=24, batch_size=4, on_batch=ticks.append) == one_by_one
    assert ticks == [4, 2]
    assert list(engine.tokens(prompts[1], max_new_tokens=24)) == one_by_one[1]  # the chat context is untouched
    engine.close()


@needs_llama
@pytest.mark.slow
def test_answers_streamed_together_are_the_answers_of_one_at_a_time(trained_adapter: Path) -> None:
    """Doctors asking at once (the chat's line) get each the answer evaluation gives their case alone, in
    interleaved pieces, each first piece as soon as that prompt is read; a stopped answer ends alone."""
    from federimed.serving.backend import answer_text

    engine = select.load_engine(SETTINGS, trained_adapter, "llama.cpp")  # the chat's engine
    prompts = [prompt_ids(engine.tokenizer, messages(d["messages"][1]["content"])) for d in dialogues(4, start=400)]
    alone = [answer_text(engine.tokenizer, a) for a in engine.greedy(prompts, max_new_tokens=24, batch_size=1)]
    texts, order = ["" for _ in prompts], []
    for seq, piece in engine.stream_together(prompts, max_new_tokens=[24, 24, 24, 3], stopped=lambda seq: False):
        order.append((seq, piece is None))
        texts[seq] += piece or ""
    assert [t.strip() for t in texts[:3]] == alone[:3]
    assert len(engine.tokenizer(texts[3].strip())["input_ids"]) <= 3 and alone[3].startswith(texts[3].strip())
    assert [seq for seq, _ in order[:4]] == [0, 1, 2, 3]  # every first piece before the answers advance
    assert sorted(seq for seq, ended in order if ended) == [0, 1, 2, 3]
    stopped, got = {1}, ["", ""]
    for seq, piece in engine.stream_together(prompts[:2], max_new_tokens=[24, 24], stopped=lambda seq: seq in stopped):
        got[seq] += piece or ""
    assert got[0].strip() == alone[0] and got[1] == ""
    engine.close()


@needs_llama
@pytest.mark.slow
def test_an_answer_depends_only_on_its_prompt_not_on_what_was_asked_before() -> None:
    engine = select.load_engine(SETTINGS, None, "llama.cpp")
    case = "Patient: 58-year-old male\nNew diagnosis: Essential hypertension\nRecent findings: BP 152/96 mmHg"
    prompts = [prompt_ids(engine.tokenizer, Prepared.of(case, []).messages)]
    prompts += [prompt_ids(engine.tokenizer, messages(d["messages"][1]["content"])) for d in dialogues(3, start=300)]
    first = [list(engine.tokens(p, max_new_tokens=48)) for p in prompts]
    again = [list(engine.tokens(p, max_new_tokens=48)) for p in prompts for _ in range(2)]  # each prompt twice
    assert again == [answer for answer in first for _ in range(2)]
    engine.close()


@needs_llama
@pytest.mark.slow
def test_assistant_serves_a_checkpoint_with_llama_cpp_and_streams(trained_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(select.ENGINE_ENV, raising=False)
    runs_dir = trained_adapter.parent.parent
    (trained_adapter / "adapter.gguf").unlink(missing_ok=True)
    assistant = Assistant(adapter="latest", runs_dir=runs_dir, retrieval=False)
    assert assistant.engine == "llama.cpp" and assistant.notice is None
    case = "Patient: 60-year-old male\nNew diagnosis: Essential hypertension"
    pieces = list(assistant.stream(case, max_new_tokens=16))
    assert (trained_adapter / "adapter.gguf").is_file(), "exported on first use"
    assert len(pieces) >= 2 and "".join(pieces) == assistant.answer(case, max_new_tokens=16).text
    stream = assistant.stream(case, max_new_tokens=16)
    next(stream)
    stream.close()  # a consumer that stops early must not keep the engine locked
    assert assistant.answer(case, max_new_tokens=4).text
