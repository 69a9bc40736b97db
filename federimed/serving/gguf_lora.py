"""Export a PEFT LoRA checkpoint as a llama.cpp GGUF LoRA adapter, once per checkpoint.

llama.cpp's adapter format (see its convert_lora_to_gguf.py and llama-adapter.cpp): general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and per wrapped layer the tensors
`blk.N.attn_q.weight.lora_a` (PEFT lora_A, r × in) and `.lora_b` (PEFT lora_B, out × r); llama.cpp
scales the product by alpha / r, as PEFT does. llama.cpp stores the attention q/k weights of Llama
models with their rows permuted relative to Hugging Face (for its RoPE layout), so the rows of the
q/k lora_B matrices are permuted the same way. The served file carries the fingerprint of what it was
built from (the adapter's weights and config, the base GGUF); it is rebuilt when that changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from federimed.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from federimed.config import ModelSettings, cache_root
from federimed.serving.requantise import ServedWeights, served_copy

EXPORT_FORMAT = 1
"""Part of the fingerprint: bump when the exported file would change for the same checkpoint."""
SERVED_FILE = "adapter.gguf"
FINGERPRINT_KEY = "federimed.source_sha256"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class ExportError(ValueError):
    """A checkpoint cannot be served by llama.cpp (unsupported adapter, or it does not fit the base)."""


@dataclass(frozen=True)
class BaseLayout:
    """What the export needs to know about the base model: architecture, heads and weight shapes.

    Read from its de-quantised Hugging Face copy (config.json and the safetensors header): the same
    weights as the GGUF, and far quicker to read than the GGUF's metadata (its tokenizer arrays)."""

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]
    """Hugging Face weight name → (out features, in features)."""

    @classmethod
    def read(cls, hf_dir: Path) -> BaseLayout:
        from safetensors import safe_open

        config = json.loads((hf_dir / "config.json").read_text())
        with safe_open(hf_dir / "model.safetensors", framework="np") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
        heads = config["num_attention_heads"]
        return cls(config["model_type"], config["num_hidden_layers"], heads, config.get("num_key_value_heads", heads), shapes)


def shipped_base(settings: ModelSettings) -> tuple[Path, Path]:
    """The base GGUF file as shipped (adapters are exported for it) and its de-quantised Hugging Face copy
    (config, tokenizer, shapes; made once)."""
    from federimed.model import dequantised_copy, resolve_base

    base = resolve_base(settings)
    if not isinstance(base, Path) or base.suffix != ".gguf":
        raise ExportError(f"base model {settings.base!r} is not a GGUF file: llama.cpp serves GGUF base models only")
    return base, dequantised_copy(settings, base)


def served_base(settings: ModelSettings, weights: ServedWeights) -> Path:
    """The copy of the base GGUF file that llama.cpp runs (F16 or Q8_0, see `federimed.serving.requantise`), made once."""
    return served_copy(shipped_base(settings)[0], cache_root() / "served", weights)


def fingerprint(adapter_dir: Path, base_gguf: Path) -> str:
    """SHA-256 over the export format, the adapter's config and weights, and the base GGUF's name and size."""
    digest = hashlib.sha256(f"federimed-gguf-lora/{EXPORT_FORMAT}\n".encode())
    digest.update(f"{base_gguf.name}:{base_gguf.stat().st_size}\n".encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = adapter_dir / name
        if not path.is_file():
            raise ExportError(f"{adapter_dir} is not a PEFT checkpoint: {name} is missing")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def served_path(adapter_dir: Path, digest: str) -> Path:
    """Where the served adapter of a checkpoint lives: beside it, or in the cache when its folder is read-only."""
    if os.access(adapter_dir, os.W_OK):
        return adapter_dir / SERVED_FILE
    return cache_root() / "served" / f"{digest[:32]}.gguf"


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint recorded in an exported adapter, or None when the file is missing or unreadable."""
    try:
        field = gguf.GGUFReader(path).fields.get(FINGERPRINT_KEY)
    except (OSError, ValueError):
        return None
    return str(field.contents()) if field is not None else None


def ensure_served(adapter_dir: Path, base_gguf: Path, hf_dir: Path, *, force: bool = False) -> tuple[Path, bool]:
    """The GGUF adapter serving `adapter_dir` on `base_gguf` (the base GGUF as shipped: its served
    re-encodings share its layout and take the same adapter; de-quantised copy in `hf_dir`), exported
    unless an up-to-date one exists; and whether it was (re)built now."""
    adapter_dir = Path(adapter_dir)
    digest = fingerprint(adapter_dir, base_gguf)
    out = served_path(adapter_dir, digest)
    if not force and stored_fingerprint(out) == digest:
        return out, False
    export_lora(adapter_dir, BaseLayout.read(hf_dir), out, digest)
    return out, True


def export_lora(adapter_dir: Path, base: BaseLayout, out: Path, digest: str) -> None:
    """Write the llama.cpp LoRA adapter of the PEFT checkpoint `adapter_dir` to `out` (atomically)."""
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    alpha = _check_config(config, adapter_dir / ADAPTER_CONFIG)
    if base.arch != "llama":
        raise ExportError(f"{adapter_dir}: base architecture {base.arch!r} is not supported (only llama)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base.n_layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    weights = adapter_dir / ADAPTER_WEIGHTS
    for key, tensor in load_file(weights).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ExportError(f"{weights}: tensor {key!r} is not a LoRA A/B matrix; llama.cpp serves only LoRA on linear layers")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor.astype(np.float32)
    if not pairs:
        raise ExportError(f"{weights} holds no LoRA tensors")
    tensors = []
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise ExportError(f"{weights}: {module} has lora_{''.join(parts)} but not both lora_A and lora_B")
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        shape = base.shapes.get(f"{module}.weight")
        if name is None or shape is None:
            raise ExportError(f"{weights}: layer {module} has no counterpart in the base model")
        a, b = parts["A"], parts["B"]
        if a.shape[1] != shape[1] or b.shape[0] != shape[0] or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{weights}: {module} has lora_A {a.shape} and lora_B {b.shape}, which do not fit the base "
                f"weight {shape} (out, in): an adapter trained for another base model?"
            )
        if name.endswith(".attn_q.weight"):
            b = permute_rows(b, base.n_head)
        elif name.endswith(".attn_k.weight"):
            b = permute_rows(b, base.n_head_kv)
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string(FINGERPRINT_KEY, digest)
        for name, tensor in tensors:
            writer.add_tensor(name, np.ascontiguousarray(tensor))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection (or its lora_B) with `heads` heads from Hugging Face's
    rotary layout to llama.cpp's, as convert_hf_to_gguf.py's `LlamaModel.permute` does for the base weights."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_config(config: dict, where: Path) -> float:
    """The adapter's alpha, after refusing what llama.cpp's LoRA cannot reproduce."""
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    found = [key for key, bad in unsupported.items() if bad]
    if found:
        raise ExportError(f"{where}: {', '.join(found)} cannot be served as a llama.cpp LoRA adapter")
    return float(config["lora_alpha"])
