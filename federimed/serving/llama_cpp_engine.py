"""The llama.cpp engine: the quantised base GGUF itself, with a checkpoint's LoRA adapter as a GGUF adapter.

It reads the token ids of the Hugging Face chat template (the same prompt as the reference engine),
stops at the same end-of-turn ids and decodes with the same tokenizer. Greedy evaluation runs case by
case: llama.cpp keeps the shared prompt prefix (system prompt) in its KV cache between cases.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from federimed.serving.backend import GENERATE_LOCK, OnBatch, text_pieces


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppEngine:
    """A llama.cpp context on `base_gguf` with an optional LoRA adapter GGUF."""

    name = "llama.cpp"

    def __init__(
        self, base_gguf: Path, tokenizer: Any, *, eos: frozenset[int], context_length: int,
        adapter_gguf: Path | None = None, threads: int | None = None,
    ) -> None:  # fmt: skip
        from llama_cpp import Llama

        self.tokenizer = tokenizer
        self.context_length = context_length
        self.adapter_gguf = adapter_gguf
        self._eos = eos
        n = threads or cpu_threads()
        self._llm = Llama(
            model_path=str(base_gguf), n_ctx=context_length, n_threads=n, n_threads_batch=n,
            lora_path=str(adapter_gguf) if adapter_gguf else None, verbose=False,
        )  # fmt: skip

    def tokens(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0) -> Iterator[int]:
        """Generated token ids until an end-of-turn id or `max_new_tokens` (greedy when temperature is 0)."""
        sampling = {"temp": temperature, "top_k": 50, "top_p": 0.95, "min_p": 0.0} if temperature > 0 else {"temp": 0.0}
        with GENERATE_LOCK:
            for produced, token in enumerate(self._llm.generate(prompt_ids, repeat_penalty=1.0, **sampling), 1):
                if token in self._eos:
                    return
                yield int(token)
                if produced >= max_new_tokens:
                    return

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Text pieces of one answer, decoded as the reference engine decodes them."""
        yield from text_pieces(self.tokenizer, self.tokens(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature))

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8, on_batch: OnBatch | None = None
    ) -> list[list[int]]:
        """Greedy answer ids, one prompt after the other (`batch_size` is unused: see the module note)."""
        answers = []
        for ids in prompts:
            answers.append(list(self.tokens(ids, max_new_tokens=max_new_tokens)))
            if on_batch:
                on_batch(1)
        return answers

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The logits after reading `prompt_ids` (for checking the engine against the reference)."""
        import llama_cpp

        with GENERATE_LOCK:
            self._llm.reset()
            self._llm.eval(prompt_ids)
            pointer = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
            return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),)).copy()

    def close(self) -> None:
        """Free the llama.cpp model and context now rather than at garbage collection."""
        self._llm.close()
