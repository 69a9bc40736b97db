"""The llama.cpp engine: copies of the base GGUF (see `federimed.serving.requantise`), with a checkpoint's
LoRA adapter as a GGUF adapter.

It reads the token ids of the Hugging Face chat template (the same prompt as the reference engine),
stops at the same end-of-turn ids and decodes with the same tokenizer. The main model (the F16 copy)
reads every prompt: its matrix products are the fastest here and round least. Evaluation and the chat's
greedy answers decode with it too, in step on a second context holding several sequences: each prompt
is read on its own (its first token out at once), then every unfinished answer advances by one token
per llama.cpp batch; each answer is the one it gets alone (`federimed ask` streams its greedy answer this
way too, as a batch of one). A sampled answer (`stream`, temperature > 0): the main model reads the prompt
and picks the first token, then hands its KV cache to a decoder (the Q8_0 copy, same architecture and
cache layout), which decodes one token at a time faster.

Every prompt is read from its first token, so an answer depends only on its prompt, not on what was
asked before. (Reusing the KV cache of a prefix shared with the previous prompt changes how the rest
is split into matrix products, and the rows of a product come out rounded differently depending on
how many it holds: a case asked twice got two different answers. The shared prefix is the ~50-token
system prompt, little to save.)

Models are opened with `federimed.serving.llama_runtime.load_llama`: llama.cpp's extra weight buffer
types only where this CPU allows them (off on Intel CPUs with AMX, whose kernels crash on batches).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from federimed.serving.backend import GENERATE_LOCK, OnBatch, Piece, PieceDecoder, Stopped, text_pieces


CONTEXT_STEP = 1024
"""Room for each sequence of a batch context, in steps of this many tokens (llama.cpp pads to 256s)."""


def cpu_threads() -> int:
    """The cores this process may run on, or fewer where a parent gave it its share in OMP_NUM_THREADS (the
    demo's and the experiment's stages running side by side do): llama.cpp's threads spin while they wait,
    so two evaluations with a thread per core each slowed one another several times over."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores, int(share)) if share.isdigit() and int(share) > 0 else cores


class LlamaCppEngine:
    """llama.cpp on a copy of the base (and optionally a second copy that decodes streamed answers), with
    an optional LoRA adapter GGUF on both."""

    name = "llama.cpp"

    def __init__(
        self, base_gguf: Path, tokenizer: Any, *, eos: frozenset[int], context_length: int,
        adapter_gguf: Path | None = None, decoder_gguf: Path | None = None, threads: int | None = None,
    ) -> None:  # fmt: skip
        """`base_gguf` reads prompts (and decodes evaluation answers); `decoder_gguf`, a copy of the same
        base in a smaller format, decodes streamed answers (None: `base_gguf` decodes them too)."""
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.adapter_gguf = adapter_gguf
        self._eos = eos
        self._threads = threads or cpu_threads()
        self._llm = self._load(base_gguf)
        self._decoder = self._load(decoder_gguf) if decoder_gguf else None
        self._batch: tuple[int, int, Any, Any] | None = None  # sequences, tokens each, context, batch

    def _load(self, gguf: Path) -> Any:
        from federimed.serving.llama_runtime import load_llama

        n = self._threads
        return load_llama(
            str(gguf), n_ctx=self.context_length, n_threads=n, n_threads_batch=n,
            lora_path=str(self.adapter_gguf) if self.adapter_gguf else None, flash_attn=True, verbose=False,
        )  # fmt: skip

    def tokens(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0) -> Iterator[int]:
        """Generated token ids until an end-of-turn id or `max_new_tokens` (greedy when temperature is 0):
        the first from the main model, the rest from the decoder when there is one."""
        sampling = {"temp": temperature, "top_k": 50, "top_p": 0.95, "min_p": 0.0} if temperature > 0 else {"temp": 0.0}
        with GENERATE_LOCK:
            self._llm.reset()  # read the whole prompt: see the module docstring
            reading = self._llm.generate(prompt_ids, repeat_penalty=1.0, **sampling)
            if self._decoder is None:
                yield from self._until_end(reading, max_new_tokens)
                return
            first = int(next(reading))
            reading.close()
            if first in self._eos:
                return
            yield first
            if max_new_tokens > 1:
                self._hand_over(prompt_ids)
                decoding = self._decoder.generate([first], reset=False, repeat_penalty=1.0, **sampling)
                yield from self._until_end(decoding, max_new_tokens - 1)

    def _until_end(self, generated: Generator[int, Any, None], max_new_tokens: int) -> Iterator[int]:
        with closing(generated):
            for produced, token in enumerate(generated, 1):
                if token in self._eos:
                    return
                yield int(token)
                if produced >= max_new_tokens:
                    return

    def _hand_over(self, prompt_ids: list[int]) -> None:
        """Give the decoder the main model's KV cache of the prompt just read, as if it had read it itself."""
        import llama_cpp

        assert self._decoder is not None
        size = llama_cpp.llama_state_seq_get_size(self._llm.ctx, 0)
        state = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._llm.ctx, state, size, 0)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._decoder.ctx), False)  # drop cells, keep buffers
        if not 0 < written == size or llama_cpp.llama_state_seq_set_data(self._decoder.ctx, state, written, 0) != written:
            raise RuntimeError("llama.cpp could not hand the prompt's KV cache to the decoding model")
        self._decoder.input_ids[: len(prompt_ids)] = prompt_ids
        self._decoder.n_tokens = len(prompt_ids)  # generate(reset=False) goes on from here

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Text pieces of one answer, decoded as the reference engine decodes them."""
        yield from text_pieces(self.tokenizer, self.tokens(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature))

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8, on_batch: OnBatch | None = None
    ) -> list[list[int]]:
        """Greedy answer ids of every prompt, `batch_size` answers decoded together."""
        if not prompts:
            return []
        size = min(batch_size, len(prompts))
        answers: list[list[int]] = []
        with GENERATE_LOCK:
            ctx, batch = self._batch_context(size, prompts, max_new_tokens)
            for start in range(0, len(prompts), size):
                chunk = prompts[start : start + size]
                answers_of: list[list[int]] = [[] for _ in chunk]
                for seq, token in self._together(ctx, batch, chunk, [max_new_tokens] * len(chunk)):
                    if token is not None:
                        answers_of[seq].append(token)
                answers += answers_of
                if on_batch:
                    on_batch(len(chunk))
        return answers

    def stream_together(
        self, prompts: Sequence[list[int]], *, max_new_tokens: Sequence[int], stopped: Stopped
    ) -> Iterator[Piece]:
        """Pieces of the greedy answers to `prompts`, decoded together with the main model (the evaluation's
        path: each answer is the one `greedy` gives it alone). Each prompt's first piece comes as soon as
        that prompt is read, before the next prompt is read."""
        decoders = [PieceDecoder(self.tokenizer) for _ in prompts]
        with GENERATE_LOCK:
            ctx, batch = self._batch_context(len(prompts), prompts, max(max_new_tokens))
            for seq, token in self._together(ctx, batch, prompts, max_new_tokens, stopped):
                if token is None:
                    if rest := decoders[seq].flush():
                        yield seq, rest
                    yield seq, None
                elif piece := decoders[seq].push(token):
                    yield seq, piece

    def _batch_context(self, sequences: int, prompts: Sequence[list[int]], max_new_tokens: int) -> tuple[Any, Any]:
        """A context with room for `sequences` of these prompts and answers, and a llama.cpp batch for it: the
        last ones made, kept while big enough (making a context takes longer than reading a short prompt)."""
        from llama_cpp._internals import LlamaBatch

        per_sequence = max(CONTEXT_STEP, -(-(max(len(p) for p in prompts) + max_new_tokens + 1) // CONTEXT_STEP) * CONTEXT_STEP)
        kept = self._batch
        if kept is None or kept[0] < sequences or kept[1] < per_sequence:
            self._close_batch()
            context = self._context(sequences, sequences * per_sequence)
            batch = LlamaBatch(n_tokens=max(self._llm.n_batch, sequences), embd=0, n_seq_max=1, verbose=False)
            self._batch = kept = (sequences, per_sequence, context, batch)
        return kept[2].ctx, kept[3]

    def _close_batch(self) -> None:
        if self._batch is not None:
            self._batch[2].close()
            self._batch[3].close()
            self._batch = None

    def _context(self, sequences: int, n_ctx: int) -> Any:
        """A llama.cpp context on the loaded model and adapter (llama-cpp-python's `Llama` keeps them in
        private fields; its version is pinned in constraints.txt) holding `sequences` sequences, each in its
        own part of the `n_ctx`-token KV cache. (A unified cache made every sequence attend over all cells,
        slower, and with flash attention the changed summation order flipped near-tied greedy tokens;
        split caches give the same tokens as one answer at a time.)"""
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        own = self._llm.context_params
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx, sequences, False
        params.n_batch, params.n_ubatch = own.n_batch, own.n_ubatch
        params.n_threads, params.n_threads_batch, params.flash_attn_type = own.n_threads, own.n_threads_batch, own.flash_attn_type
        context = LlamaContext(model=self._llm._model, params=params, verbose=False)
        if self._llm._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._llm._lora_adapter)
            if llama_cpp.llama_set_adapters_lora(context.ctx, adapters, 1, (ctypes.c_float * 1)(self._llm.lora_scale)):
                context.close()
                raise RuntimeError(f"llama.cpp refused the LoRA adapter {self.adapter_gguf} on a second context")
        return context

    def _together(
        self, ctx: Any, batch: Any, prompts: Sequence[list[int]], limits: Sequence[int], stopped: Stopped = lambda seq: False
    ) -> Iterator[tuple[int, int | None]]:
        """Read each prompt as sequence 0, 1, … and yield its first token at once; then decode all answers in
        step, greedily, yielding (sequence, token), and (sequence, None) when an answer ends (an end-of-turn
        token, `limits[sequence]` tokens, or `stopped`)."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        step = self._llm.n_batch
        last, produced, active = {}, [0] * len(prompts), []

        def took(seq: int, token: int) -> Iterator[tuple[int, int | None]]:
            if token not in self._eos:
                produced[seq] += 1
                last[seq] = token
                yield seq, token
            if token in self._eos or produced[seq] >= limits[seq]:
                active.remove(seq)
                yield seq, None

        for seq, ids in enumerate(prompts):
            if stopped(seq):
                yield seq, None
                continue
            for offset in range(0, len(ids), step):
                piece = ids[offset : offset + step]
                self._fill(batch, [(token, offset + i, seq, offset + i == len(ids) - 1) for i, token in enumerate(piece)])
                self._decode(ctx, batch)
            active.append(seq)
            yield from took(seq, self._argmax(ctx, batch.n_tokens() - 1))
        positions = [len(p) for p in prompts]
        while active:
            for seq in [s for s in active if stopped(s)]:
                active.remove(seq)
                yield seq, None
            if not active:
                return
            stepping = list(active)
            self._fill(batch, [(last[seq], positions[seq], seq, True) for seq in stepping])
            self._decode(ctx, batch)
            for row, seq in enumerate(stepping):
                positions[seq] += 1
                yield from took(seq, self._argmax(ctx, row))

    @staticmethod
    def _fill(batch: Any, entries: list[tuple[int, int, int, bool]]) -> None:
        """Set the batch to (token, position, sequence, wants logits) entries."""
        raw = batch.batch
        raw.n_tokens = len(entries)
        for i, (token, position, seq, logits) in enumerate(entries):
            raw.token[i], raw.pos[i], raw.n_seq_id[i], raw.logits[i] = token, position, 1, logits
            raw.seq_id[i][0] = seq

    @staticmethod
    def _decode(ctx: Any, batch: Any) -> None:
        import llama_cpp

        status = llama_cpp.llama_decode(ctx, batch.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _argmax(self, ctx: Any, row: int) -> int:
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._llm.n_vocab(),))
        return int(logits.argmax())

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The logits after reading `prompt_ids` (for checking the engine against the reference)."""
        import llama_cpp

        with GENERATE_LOCK:
            self._llm.reset()
            self._llm.eval(prompt_ids)
            pointer = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
            return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),)).copy()

    def close(self) -> None:
        """Free the llama.cpp models and contexts now rather than at garbage collection."""
        self._close_batch()
        self._llm.close()
        if self._decoder is not None:
            self._decoder.close()
