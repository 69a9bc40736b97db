"""The generation engine interface, shared helpers and the transformers reference engine.

An engine answers prompts given as token ids of the Hugging Face tokenizer's chat template (so every
engine reads exactly the same prompt): `stream` yields text pieces of one answer, `stream_together` the
pieces of several greedy answers at once (doctors asking at the same time), `greedy` returns the greedy
answer ids of many prompts (for evaluation).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from typing import Any, Protocol

GENERATE_LOCK = threading.Lock()
"""One generation at a time per process: concurrent ones only fight for the cores (and a llama.cpp
context is not thread-safe)."""

OnBatch = Callable[[int], None]
"""Called with the number of prompts answered since the last call."""
Stopped = Callable[[int], bool]
"""Whether the answer to prompt i is no longer wanted (its doctor pressed stop or left)."""
Piece = tuple[int, str | None]
"""(i, text) for a piece of the answer to prompt i; (i, None) once that answer has ended."""


class Engine(Protocol):
    """What the assistant and the evaluation need from a generation engine."""

    name: str
    tokenizer: Any
    context_length: int

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Text pieces of one answer (greedy when temperature is 0)."""
        ...

    def stream_together(
        self, prompts: Sequence[list[int]], *, max_new_tokens: Sequence[int], stopped: Stopped
    ) -> Iterator[Piece]:
        """Pieces of the greedy answers to several prompts, interleaved as they are written; an answer
        that `stopped` names ends at the next step."""
        ...

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8, on_batch: OnBatch | None = None
    ) -> list[list[int]]:
        """The greedy answer ids (without end-of-turn tokens) of every prompt, in order."""
        ...


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template applied to `messages`, ready for the assistant's turn."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of generated ids, special tokens dropped, trimmed."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def context_length(config: Any, tokenizer: Any) -> int:
    """How many tokens the model reads at most (the smaller of the model's and the tokenizer's limit)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min(v for v in limits if isinstance(v, int) and 0 < v < 10**7)


def eos_ids(generation_config: Any) -> frozenset[int]:
    """The token ids that end an answer, as `generate` uses them."""
    eos = generation_config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])


class PieceDecoder:
    """Token ids of one answer, one at a time → the new text each adds (incomplete UTF-8 held back)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""
        self._shown = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        self._text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return "" if self._text.endswith("\ufffd") else self._rest()

    def flush(self) -> str:
        return self._rest()

    def _rest(self) -> str:
        piece, self._shown = self._text[self._shown :], len(self._text)
        return piece


def text_pieces(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Decode a stream of token ids into text pieces, holding back incomplete UTF-8 characters."""
    decoder = PieceDecoder(tokenizer)
    for token in tokens:
        if piece := decoder.push(token):
            yield piece
    if piece := decoder.flush():
        yield piece


def stream_one_by_one(engine: Engine, prompts: Sequence[list[int]], max_new_tokens: Sequence[int], stopped: Stopped) -> Iterator[Piece]:
    """`stream_together` for an engine without batched decoding: each answer streamed in turn."""
    for i, ids in enumerate(prompts):
        if not stopped(i):
            pieces = engine.stream(ids, max_new_tokens=max_new_tokens[i], temperature=0.0)
            with closing(pieces):
                for piece in pieces:
                    if stopped(i):
                        break
                    yield i, piece
        yield i, None


class TransformersEngine:
    """The reference: Hugging Face `generate` (any model id, GPUs); batched greedy for evaluation."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length(model.config, tokenizer)
        self._eos = eos_ids(model.generation_config)

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Generate in a worker thread and stream its text; stops generating when the consumer stops."""
        import torch
        from transformers import (
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stop.is_set()

        errors: list[BaseException] = []
        inputs = torch.tensor([prompt_ids], device=self.model.device)

        def run() -> None:
            try:
                with GENERATE_LOCK:
                    self.model.generate(
                        input_ids=inputs,
                        attention_mask=torch.ones_like(inputs),
                        max_new_tokens=max_new_tokens,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        pad_token_id=self.tokenizer.pad_token_id,
                        **_sampling(temperature),
                    )
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="federimed-generate", daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]

    def stream_together(
        self, prompts: Sequence[list[int]], *, max_new_tokens: Sequence[int], stopped: Stopped
    ) -> Iterator[Piece]:
        """One answer after another (`generate` streams one sequence)."""
        return stream_one_by_one(self, prompts, max_new_tokens, stopped)

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 8, on_batch: OnBatch | None = None
    ) -> list[list[int]]:
        """`batch_size` prompts at a time, left-padded, prompts of similar length batched together."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=self.model.device)
            with GENERATE_LOCK, torch.no_grad():
                output = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                    **_sampling(0.0),
                )  # fmt: skip
            for i, row in zip(chunk, output[:, width:].tolist()):
                answers[i] = _until_eos(row, self._eos)
            if on_batch:
                on_batch(len(chunk))
        return answers


def _until_eos(ids: Iterable[int], eos: frozenset[int]) -> list[int]:
    out = []
    for token in ids:
        if token in eos:
            break
        out.append(token)
    return out


def _sampling(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": 0.95}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
