"""Dialogue loading and encoding (assistant-only labels, truncation) and the local training loop."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from dialogue_samples import TREATMENTS, dialogue, dialogues, write_jsonl

from federimed.config import LoraSettings, TrainSettings
from federimed.model import adapter_state, add_lora, load_adapter_state
from federimed.training import (
    IGNORE,
    DialogueError,
    add_proximal_gradient,
    batch_loss,
    collate,
    encode_dialogues,
    evaluate_loss,
    load_dialogues,
    lr_at,
    train_local,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def tokenizer(base):
    return base[1]


@pytest.fixture(scope="module")
def peft(base):
    return add_lora(base[0], LoraSettings(), seed=0)


def test_load_dialogues_reads_contract_lines(tmp_path):
    rows = dialogues(3)
    loaded = load_dialogues(write_jsonl(tmp_path / "train.jsonl", rows))
    assert loaded == rows


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"id": "a", "patient": "p", "messages": [{"role": "user", "content": "hi"}]}), "messages"),
        (json.dumps({"id": "a", "messages": []}), "'patient'"),
        (json.dumps({"id": "a", "patient": "p", "messages": [{"role": "doctor", "content": "x"}] * 2}), "role"),
    ],
)
def test_load_dialogues_names_file_and_line_of_a_bad_line(tmp_path, line, problem):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(dialogue(0, "hyperlipidemia")) + "\n\n" + line + "\n")
    with pytest.raises(DialogueError, match=rf"train\.jsonl, line 3: .*{problem}"):
        load_dialogues(path)


def test_labels_cover_exactly_the_assistant_answer(tokenizer):
    rows = dialogues(4)
    examples = encode_dialogues(tokenizer, rows, 256)
    assert len(examples) == 4
    for row, example in zip(rows, examples):
        labelled = example.labels != IGNORE
        assert torch.equal(example.labels[labelled], example.input_ids[labelled])
        positions = labelled.nonzero().flatten().tolist()
        assert positions == list(range(positions[0], positions[-1] + 1)), "one contiguous answer span"
        answer = row["messages"][-1]["content"]
        assert tokenizer.decode(example.labels[labelled], skip_special_tokens=True) == answer
        assert int(example.input_ids[positions[-1]]) == tokenizer.convert_tokens_to_ids("<|im_end|>")
        prompt = tokenizer.decode(example.input_ids[: positions[0]])
        assert prompt.endswith("<|im_start|>assistant\n") and answer not in prompt
        assert example.truncated == 0


def test_long_case_is_cut_from_the_left_and_the_answer_kept(tokenizer):
    long = dialogue(1, "essential hypertension", case_lines=40)
    (full,) = encode_dialogues(tokenizer, [long], 1024)
    (cut,) = encode_dialogues(tokenizer, [long], 96)
    assert len(full.input_ids) > 96 >= len(cut.input_ids) >= 90
    assert cut.truncated >= len(full.input_ids) - 96
    text = tokenizer.decode(cut.input_ids)
    assert "New diagnosis: essential hypertension. What was started?" in text
    assert "Visit 0:" not in text and text.startswith("<|im_start|>system\n" + long["messages"][0]["content"])
    answer = tokenizer.decode(cut.labels[cut.labels != IGNORE], skip_special_tokens=True)
    assert answer == "Started lisinopril 10 MG Oral Tablet."


def test_dialogue_whose_answer_cannot_fit_is_left_out_by_name(tokenizer, caplog):
    rows = dialogues(2)
    with caplog.at_level(logging.WARNING):
        examples = encode_dialogues(tokenizer, rows, 40)
    assert examples == []
    assert "left out 2 dialogue(s)" in caplog.text and "#1 (case-0001)" in caplog.text


def test_padded_batch_loss_equals_unpadded_loss(peft, tokenizer):
    examples = encode_dialogues(tokenizer, [dialogue(1, "hyperlipidemia", case_lines=5), dialogue(2, "hyperlipidemia")], 256)
    assert len(examples[0].input_ids) != len(examples[1].input_ids)
    peft.eval()
    with torch.no_grad():
        singles = [peft(input_ids=e.input_ids[None], labels=e.labels[None]).loss.item() for e in examples]
        counts = [int((e.labels[1:] != IGNORE).sum()) for e in examples]
        batched, count = batch_loss(peft, collate(examples, tokenizer.pad_token_id, torch.device("cpu")))
        evaluated, evaluated_count = evaluate_loss(peft, examples, batch_size=2, precision="fp32", pad_to_multiple_of=1)
        bucketed = collate(examples, tokenizer.pad_token_id, torch.device("cpu"), pad_to_multiple_of=32)
        bucketed_loss, bucketed_count = batch_loss(peft, bucketed)
        evaluated_bucketed, _ = evaluate_loss(peft, examples, batch_size=2, precision="fp32", pad_to_multiple_of=32)
    expected = sum(s * c for s, c in zip(singles, counts)) / sum(counts)
    assert count == evaluated_count == bucketed_count == sum(counts)
    assert batched.item() == pytest.approx(expected, rel=1e-4)
    assert evaluated == pytest.approx(expected, rel=1e-4)
    longest = max(len(e.input_ids) for e in examples)
    assert longest % 32, "the examples must need padding for this test to mean anything"
    assert bucketed["input_ids"].shape[1] % 32 == 0 and longest < bucketed["input_ids"].shape[1] < longest + 32
    assert bucketed["keep"] % 32 == 0
    assert bucketed_loss.item() == pytest.approx(expected, rel=1e-4)
    assert evaluated_bucketed == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("precision", "kernel"), [("bf16", "eager"), ("fp32", "sdpa")])
def test_training_attends_with_its_kernel_and_leaves_the_model_as_it_was(peft, tokenizer, precision, kernel):
    attention = peft.base_model.model.model.layers[0].self_attn
    kernels = []
    hook = attention.register_forward_pre_hook(lambda module, args: kernels.append(module.config._attn_implementation))
    before = peft.config._attn_implementation
    try:
        train_local(peft, tokenizer, encode_dialogues(tokenizer, dialogues(2, list(TREATMENTS)), 128),
                    TrainSettings(batch_size=2, precision=precision), steps=1)
    finally:
        hook.remove()
    assert before == "sdpa"
    assert kernels == [kernel]
    assert peft.config._attn_implementation == attention.config._attn_implementation == before


def test_cosine_schedule_spans_the_whole_federation():
    settings = TrainSettings(lr=1e-3, lr_min_ratio=0.1, warmup_steps=2)
    assert lr_at(0, 20, settings) == pytest.approx(5e-4)
    assert lr_at(1, 20, settings) == pytest.approx(1e-3)
    assert lr_at(11, 20, settings) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(20, 20, settings) == pytest.approx(1e-4)
    rates = [lr_at(step, 20, settings) for step in range(1, 21)]
    assert rates == sorted(rates, reverse=True)


def test_same_seed_gives_the_same_adapter_and_another_seed_does_not(peft, tokenizer):
    examples = encode_dialogues(tokenizer, dialogues(8), 128)
    initial = adapter_state(peft)
    settings = TrainSettings(batch_size=2, seq_len=128, seed=3)

    def run(seed: int) -> dict[str, torch.Tensor]:
        load_adapter_state(peft, initial)
        train_local(peft, tokenizer, examples, settings.model_copy(update={"seed": seed}), steps=2, start_step=4)
        return adapter_state(peft)

    first, second, other = run(3), run(3), run(4)
    load_adapter_state(peft, initial)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert any(not torch.equal(first[k], initial[k]) for k in first)


def test_the_proximal_gradient_is_that_of_fedprox_term() -> None:
    """Gradient of loss + μ/2 Σ ‖w − w₀‖², by autograd, equals the loss's gradient plus μ (w − w₀)."""
    torch.manual_seed(0)
    anchors = [torch.randn(3, 4), torch.randn(5)]
    params = [(a + 0.1 * torch.randn_like(a)).requires_grad_() for a in anchors]
    weights = [torch.randn_like(a) for a in anchors]
    mu = 0.7
    sum((w * p).sum() for w, p in zip(weights, params)).backward()
    add_proximal_gradient(params, anchors, mu)
    copies = [p.detach().clone().requires_grad_() for p in params]
    loss = sum((w * p).sum() + mu / 2 * ((p - a) ** 2).sum() for w, p, a in zip(weights, copies, anchors))
    loss.backward()
    for param, copy in zip(params, copies):
        torch.testing.assert_close(param.grad, copy.grad)


def test_fedprox_keeps_the_adapter_nearer_where_the_round_started(peft, tokenizer):
    examples = encode_dialogues(tokenizer, dialogues(8), 128)
    initial = adapter_state(peft)
    settings = TrainSettings(batch_size=2, seq_len=128)  # the proximal gradient is added before clipping

    def distance(mu: float) -> float:
        load_adapter_state(peft, initial)
        train_local(peft, tokenizer, examples, settings, steps=4, proximal_mu=mu)
        moved = adapter_state(peft)
        return math.sqrt(sum(float((moved[k] - initial[k]).pow(2).sum()) for k in initial))

    free, held = distance(0.0), distance(1000.0)
    load_adapter_state(peft, initial)
    assert 0 < held < 0.8 * free


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_lowers_held_out_loss(peft, tokenizer, precision):
    """Two passes over a tiny task, in either precision (bf16 is emulated where the CPU lacks it)."""
    conditions = list(TREATMENTS)
    train = encode_dialogues(tokenizer, dialogues(16, conditions), 128)
    heldout = encode_dialogues(tokenizer, dialogues(8, conditions, start=100), 128)
    initial = adapter_state(peft)
    before, tokens = evaluate_loss(peft, heldout, batch_size=8)
    settings = TrainSettings(batch_size=4, seq_len=128, lr=2e-3, precision=precision)
    result = train_local(peft, tokenizer, train, settings, steps=8)
    after, _ = evaluate_loss(peft, heldout, batch_size=8)
    load_adapter_state(peft, initial)
    assert result.steps == 8 and result.examples_seen == 32
    assert result.tokens == pytest.approx(32 * sum(len(e.input_ids) for e in train) / 16, rel=0.3)
    assert result.seconds > 0 and math.isfinite(result.loss)
    assert tokens > 8 * 5
    assert after < 0.6 * before, (before, after)


def test_train_local_refuses_no_examples_and_a_short_schedule(peft, tokenizer):
    settings = TrainSettings()
    with pytest.raises(ValueError, match="at least one example"):
        train_local(peft, tokenizer, [], settings, steps=1)
    with pytest.raises(ValueError, match="schedule"):
        train_local(peft, tokenizer, encode_dialogues(tokenizer, dialogues(1), 128), settings, steps=5, total_steps=3)


def test_training_logged_to_a_file_reports_progress_and_time_left(peft, tokenizer, capsys, monkeypatch):
    """Output that is not a terminal (a stage's log file) gets progress lines with the time left."""
    import federimed.progress as progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    initial = adapter_state(peft)
    examples = encode_dialogues(tokenizer, dialogues(4), 96)
    train_local(peft, tokenizer, examples, TrainSettings(batch_size=2, seq_len=96), steps=2, start_step=2,
                total_steps=8, progress=True)
    load_adapter_state(peft, initial)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training step")]
    assert [line.split(" · ")[0] for line in lines] == ["training step 3/8", "training step 4/8"]
    assert all(" s each · about " in line and line.endswith(" left") for line in lines)


def test_length_grouped_batches_cover_each_pass_once_with_little_padding() -> None:
    from federimed.training import GROUP_BATCHES, length_grouped_batches

    rng = torch.Generator().manual_seed(3)
    lengths = torch.randint(100, 260, (189,), generator=rng).tolist()
    sampler = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    span = 4 * GROUP_BATCHES
    per_pass = sum(-(-min(span, 189 - start) // 4) for start in range(0, 189, span))
    for _ in range(2):  # two passes: every dialogue exactly once in each
        batches = [next(sampler) for _ in range(per_pass)]
        assert sorted(i for b in batches for i in b) == list(range(189))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.05  # random batches of 4 from these lengths pad about 20 %
    again = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert [next(again) for _ in range(per_pass)] != batches  # passes are reshuffled (this was the second)
