"""Settings validation: defaults, clear errors, and the run.json round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from federimed.config import LoraSettings, ModelSettings, RunSettings, TrainSettings


def test_defaults_describe_the_validated_recipe():
    settings = RunSettings()
    assert settings.model == ModelSettings(base="smollm2-135m-instruct", device="auto", dtype="auto")
    assert (settings.lora.r, settings.lora.alpha, settings.lora.target_modules) == (8, 16, "all-linear")
    assert (settings.train.epochs, settings.train.batch_size, settings.train.seq_len) == (8, 4, 256)
    assert (settings.rounds, settings.lora.dropout) == (8, 0)
    assert RunSettings.model_validate(settings.model_dump()) == settings


def test_epochs_spread_passes_over_the_rounds_per_site():
    settings = RunSettings(rounds=4, train=TrainSettings(epochs=4, batch_size=4))
    assert settings.steps_per_round(189) == 48  # one pass of 189 dialogues per round: ceil(189 / 4)
    assert settings.steps_per_round(34) == 9
    assert RunSettings(rounds=8, train=TrainSettings(epochs=1, batch_size=4)).steps_per_round(10) == 1  # at least one
    assert RunSettings(rounds=2, train=TrainSettings(epochs=3, batch_size=2)).steps_per_round(10) == 8  # 7.5 rounded up


def test_fixed_local_steps_replace_epochs_only_when_asked_for():
    assert TrainSettings(local_steps=3).epochs == 0  # steps alone: steps
    assert RunSettings(train=TrainSettings(local_steps=3)).steps_per_round(1000) == 3
    both = TrainSettings(local_steps=3, epochs=2)
    assert RunSettings(rounds=2, train=both).steps_per_round(16) == 4  # epochs given: 2 × 16 / (4 × 2)
    restored = TrainSettings.model_validate(TrainSettings(local_steps=3).model_dump())
    assert restored.epochs == 0 and restored.local_steps == 3


@pytest.mark.parametrize(
    ("build", "field", "message"),
    [
        (lambda: ModelSettings(device="gpu"), "device", "not one of auto, cpu"),
        (lambda: ModelSettings(dtype="fp8"), "dtype", "not one of auto, float32"),
        (lambda: ModelSettings(base="  "), "base", "not empty"),
        (lambda: LoraSettings(r=0), "r", "greater than or equal to 1"),
        (lambda: LoraSettings(dropout=1.0), "dropout", "less than 1"),
        (lambda: LoraSettings(target_modules=[]), "target_modules", "non-empty list"),
        (lambda: TrainSettings(lr=0), "lr", "greater than 0"),
        (lambda: TrainSettings(lr_min_ratio=1.5), "lr_min_ratio", "less than or equal to 1"),
        (lambda: TrainSettings(seq_len=8), "seq_len", "greater than or equal to 32"),
        (lambda: RunSettings(rounds=0), "rounds", "greater than or equal to 1"),
        (lambda: TrainSettings(local_step=5), "local_step", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_are_named(build, field, message):
    with pytest.raises(ValidationError, match=message) as caught:
        build()
    assert caught.value.errors()[0]["loc"][-1] == field


def test_assignment_is_validated_too():
    settings = TrainSettings()
    with pytest.raises(ValidationError, match="batch_size"):
        settings.batch_size = 0


def test_heldout_sample_is_the_first_n_dialogues_and_zero_means_all():
    assert RunSettings(heldout_max_dialogues=2).heldout_sample([5, 6, 7]) == [5, 6]
    assert RunSettings(heldout_max_dialogues=0).heldout_sample([5, 6, 7]) == [5, 6, 7]
    with pytest.raises(ValidationError):
        RunSettings(heldout_max_dialogues=-1)


def test_padding_is_32_in_the_low_memory_mode_and_the_longest_dialogue_otherwise() -> None:
    assert TrainSettings().padding == 1
    assert TrainSettings(checkpointing=True).padding == 32
    assert TrainSettings(pad_to_multiple_of=8).padding == 8
    assert TrainSettings(pad_to_multiple_of=8, checkpointing=True).padding == 8
