"""Which engine answers: llama.cpp for the default GGUF base on a CPU when `llama_cpp` imports, else the
transformers reference. `FEDERIMED_ENGINE` (auto | llama.cpp | transformers) overrides the choice."""

from __future__ import annotations

import logging
import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

from federimed.config import DEFAULT_BASE, ModelSettings
from federimed.serving.backend import Engine

log = logging.getLogger(__name__)

ENGINES = ("auto", "llama.cpp", "transformers")
Purpose = Literal["chat", "evaluation"]
ENGINE_ENV = "FEDERIMED_ENGINE"
FALLBACK_NOTICE = (
    "Fast CPU inference is unavailable ({why}): answering with the slower transformers engine. "
    "Install it with `pip install 'federimed[fast]'` (compiles llama.cpp)."
)


@lru_cache(maxsize=1)
def llama_cpp_problem() -> str | None:
    """Why `llama_cpp` cannot be used (not installed, or its compiled library fails to load), or None."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        return f"llama-cpp-python does not import: {exc}"
    return None


def choose_engine(settings: ModelSettings, requested: str | None = None) -> tuple[str, str | None]:
    """The engine for `settings` ("llama.cpp" or "transformers") and a notice for the user when the fast
    engine should have answered but cannot."""
    requested = requested or os.environ.get(ENGINE_ENV) or "auto"
    if requested not in ENGINES:
        raise ValueError(f"engine {requested!r} (from the argument or ${ENGINE_ENV}) is not one of {', '.join(ENGINES)}")
    if requested == "transformers":
        return "transformers", None
    from federimed.model import ModelLoadError, placement

    if settings.base != DEFAULT_BASE or placement(settings)[0].type != "cpu":
        if requested == "llama.cpp":
            raise ModelLoadError(
                f"the llama.cpp engine serves the default base model {DEFAULT_BASE!r} on a CPU; "
                f"this is {settings.base!r} on {settings.device}: use the transformers engine"
            )
        return "transformers", None
    problem = llama_cpp_problem()
    if problem is None:
        return "llama.cpp", None
    if requested == "llama.cpp":
        raise ModelLoadError(f"the llama.cpp engine was asked for but {problem}")
    notice = FALLBACK_NOTICE.format(why=problem)
    _warn_once(notice)
    return "transformers", notice


def load_engine(
    settings: ModelSettings, adapter_dir: Path | None, engine: str | None = None, *,
    loaded: tuple[Any, Any] | None = None, purpose: Purpose = "chat",
) -> Engine:  # fmt: skip
    """The engine answering with the base model plus the adapter in `adapter_dir` (None: bare base).

    `engine` as for `choose_engine`; `loaded` is an already loaded (model, tokenizer) of this version
    that the transformers engine reuses; `purpose`: "chat" (llama.cpp streams answers with a faster
    decoder) or "evaluation" (llama.cpp decodes as the reference does: `federimed.serving.requantise`).
    A checkpoint llama.cpp cannot serve falls back to transformers.
    """
    from federimed.serving.backend import TransformersEngine

    if choose_engine(settings, engine)[0] == "llama.cpp":
        from federimed.serving.gguf_lora import ExportError

        try:
            return _llama_cpp_engine(settings, adapter_dir, purpose)
        except ExportError as exc:
            if engine == "llama.cpp":
                raise
            log.warning("%s: answering with the transformers engine", exc)
    if loaded is None:
        from federimed.model import load_for_inference

        loaded = load_for_inference(settings, adapter_dir)
    return TransformersEngine(*loaded)


def _llama_cpp_engine(settings: ModelSettings, adapter_dir: Path | None, purpose: Purpose) -> Engine:
    """The served base GGUFs (F16 reads and decodes greedy answers; Q8_0 decodes sampled chat answers), the served
    adapter (exported on first use) and the de-quantised model's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from federimed.serving.backend import context_length, eos_ids
    from federimed.serving.gguf_lora import ensure_served, served_base, shipped_base
    from federimed.serving.llama_cpp_engine import LlamaCppEngine

    shipped, hf_dir = shipped_base(settings)
    base = served_base(settings, "f16")
    decoder = served_base(settings, "q8_0") if purpose == "chat" else None
    if decoder == base:  # a base without 4-bit tensors: one copy does both
        decoder = None
    adapter = None
    if adapter_dir is not None:
        adapter, rebuilt = ensure_served(Path(adapter_dir), shipped, hf_dir)
        if rebuilt:
            log.info("exported %s for llama.cpp into %s", adapter_dir, adapter)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = context_length(AutoConfig.from_pretrained(hf_dir, local_files_only=True), tokenizer)
    eos = eos_ids(GenerationConfig.from_pretrained(hf_dir, local_files_only=True))
    return LlamaCppEngine(base, tokenizer, eos=eos, context_length=limit, adapter_gguf=adapter, decoder_gguf=decoder)


@cache
def _warn_once(message: str) -> None:
    log.warning(message)
