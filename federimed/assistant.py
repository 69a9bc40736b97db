"""Answer a doctor's case: de-identify it, retrieve guideline snippets, prompt the fine-tuned model, stream.

A case is free text pasted by a doctor (scrubbed of obvious identifiers first) or a FHIR bundle
(summarised, de-identified, by ingest). The prompt keeps the format the model was fine-tuned on
(`ingest.dialogues`: system prompt + compact case lines + question) and adds the retrieved guideline
snippets, numbered [1], [2], ... to the system message. Prompts and answers are never logged: only
their lengths and timings are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from federimed.config import ModelSettings
from federimed.retrieval import Snippet
from federimed.scrub import scrub_free_text
from federimed.serving.turns import AnswerLine, OnWait
from ingest.dialogues import QUESTION, SYSTEM_PROMPT

if TYPE_CHECKING:
    from federimed.checkpoints import Version
    from federimed.free_text import Understood
    from federimed.retrieval import GuidelineIndex
    from federimed.serving.backend import Engine

log = logging.getLogger(__name__)

MAX_CASE_CHARS = 6000
"""Longest case text accepted (a compact case is a few hundred characters)."""
SNIPPET_CHARS = 280
"""Each guideline snippet is cut to about this many characters in the prompt: the model is small, and on a
2-core CPU every 100 prompt tokens delay the first answer token by about 0.4 s (README, Fast CPU inference)."""
DEFAULT_K = 3
DEFAULT_MAX_NEW_TOKENS = 160
BASE = "base"

Case = str | Path | bytes
"""Free text (str) or a FHIR bundle (a file path or its bytes)."""


class CaseError(ValueError):
    """A case cannot be answered as given (empty, too long, unreadable bundle)."""


# ---------------------------------------------------------------- prompt


def format_snippets(snippets: list[Snippet]) -> str:
    """The numbered guideline block: "[1] Title — Section: text…" one per line, each cut to SNIPPET_CHARS."""
    lines = []
    for n, s in enumerate(snippets, 1):
        body = " ".join(s.text.split())
        if len(body) > SNIPPET_CHARS:
            body = body[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " …"
        heading = f"{s.title} — {s.section}" if s.section and s.section != s.title else s.title
        lines.append(f"[{n}] {heading}: {body}")
    return "\n".join(lines)


def build_prompt(case_text: str, snippets: list[Snippet]) -> list[dict[str, str]]:
    """Chat messages in the fine-tuned format (system prompt, case lines ending in the question),
    with the guideline snippets, numbered, appended to the system message."""
    user = case_text.strip()
    if not re.search(r"(?im)^question:", user):
        user += f"\nQuestion: {QUESTION}"
    system = SYSTEM_PROMPT
    if snippets:
        system += (
            "\n\nGuideline excerpts (use them where they fit the case; cite as [n]):\n" + format_snippets(snippets)
        )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def retrieval_query(case_text: str) -> str:
    """What to search the guidelines for: the first-line treatment of the new diagnosis where the case
    names one (what the model is asked), else the whole case."""
    match = re.search(r"(?im)^new diagnosis:\s*(.+)$", case_text)
    if match and match.group(1).strip().lower() != "none":
        return f"First-line treatment of {match.group(1).strip()}"
    return re.sub(r"(?im)^question:.*$", "", case_text).strip()


# ---------------------------------------------------------------- model versions and loading


@dataclass(frozen=True)
class ModelVersion:
    """Which weights answer: the base model or one saved round, with what trained it."""

    label: str
    """"base" or "RUN/round-N" (what `resolve_version` accepts)."""
    adapter_dir: Path | None = None
    mode: str | None = None
    rounds: int | None = None
    hospitals: tuple[str, ...] = ()
    examples: int | None = None
    epsilon: float | None = None
    """Hospital-level differential-privacy ε spent up to this round (None: trained without DP)."""
    delta: float | None = None
    created: str | None = None
    """When its run started (ISO date and time)."""

    def describe(self) -> str:
        """One line for the footer: "RUN/round-3 · federated · 3 rounds · 3 hospitals (a, b, c) · 1,204 examples",
        then "DP ε 9.01 at δ 1e-05 (per hospital)" for a differentially private run."""
        if self.adapter_dir is None:
            return "base model (not fine-tuned)"
        parts = [self.label]
        if self.mode:
            parts.append(self.mode)
        if self.rounds is not None:
            parts.append(f"{self.rounds} round{'' if self.rounds == 1 else 's'}")
        if self.hospitals:
            n = len(self.hospitals)
            parts.append(f"{n} hospital{'' if n == 1 else 's'} ({', '.join(self.hospitals)})")
        if self.examples is not None:
            parts.append(f"{self.examples:,} training examples")
        if self.epsilon is not None:
            parts.append(f"DP ε {self.epsilon:.2f} at δ {self.delta:g} (per hospital)")
        return " · ".join(parts)


def _version_of(info: Version) -> ModelVersion:
    return ModelVersion(
        label=f"{info.run_id}/round-{info.round}",
        adapter_dir=Path(info.path),
        mode=info.mode,
        rounds=info.round,
        hospitals=tuple(info.hospitals),
        examples=info.examples,
        epsilon=info.epsilon,
        delta=info.delta,
        created=info.created,
    )


def available_versions(runs_dir: Path) -> list[ModelVersion]:
    """The base model followed by every checkpoint under `runs_dir` (newest first, as listed)."""
    from federimed.checkpoints import list_versions

    return [ModelVersion(BASE), *(_version_of(v) for v in list_versions(runs_dir))]


def resolve_version(spec: str | Path | None, runs_dir: Path) -> tuple[ModelVersion, str | None]:
    """The version `spec` names ("base"/None, "latest", "RUN", "RUN/round-N" or a path) and a notice
    when "latest" fell back to the base model because no run exists yet."""
    from federimed.checkpoints import CheckpointError, list_versions, resolve_checkpoint

    if spec is None or str(spec) == BASE:
        return ModelVersion(BASE), None
    try:
        path = resolve_checkpoint(str(spec), runs_dir)
    except CheckpointError:
        if str(spec) == "latest" and not os.path.lexists(Path(runs_dir) / "latest"):  # only federated runs set it
            return ModelVersion(BASE), f"No federated run in {runs_dir} yet: answering with the base model."
        raise
    for info in list_versions(runs_dir):
        if Path(info.path).resolve() == Path(path).resolve():
            return _version_of(info), None
    return ModelVersion(str(path), adapter_dir=Path(path)), None


_LOADING = threading.Lock()


@lru_cache(maxsize=4)
def _load(settings_json: str, adapter_dir: str | None, engine: str) -> Engine:
    """The engine of one version, once per process; llama.cpp (native code) runs in its own process
    (`federimed.serving.guarded`), so that a crash there ends one answer, not the chat server."""
    from functools import partial

    from federimed.serving.guarded import GuardedEngine
    from federimed.serving.select import load_engine

    started = time.perf_counter()
    load = partial(load_engine, ModelSettings.model_validate_json(settings_json),
                   Path(adapter_dir) if adapter_dir else None, engine)
    loaded = GuardedEngine(load) if engine == "llama.cpp" else load()
    log.info("model loaded (%s engine) in %.1f s", loaded.name, time.perf_counter() - started)
    return loaded


@lru_cache(maxsize=4)
def _load_index(index_dir: str | None) -> GuidelineIndex:
    from federimed.retrieval import GuidelineIndex, ensure_default_index

    return GuidelineIndex.load(Path(index_dir)) if index_dir else ensure_default_index()


# ---------------------------------------------------------------- the assistant


@dataclass
class Prepared:
    """A case made ready for the model: its de-identified text, the snippets and the messages."""

    case_text: str
    snippets: list[Snippet]
    messages: list[dict[str, str]]

    @classmethod
    def of(cls, case_text: str, snippets: list[Snippet]) -> Prepared:
        """A de-identified case and its snippets, with the prompt built from them."""
        return cls(case_text, snippets, build_prompt(case_text, snippets))


@dataclass
class Answer:
    """A whole answer with its sources and the version that wrote it."""

    text: str
    snippets: list[Snippet]
    model_version: ModelVersion
    case_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _alone(together: Iterator[tuple[int, str | None]]) -> Iterator[str]:
    """The text pieces of a single answer streamed by `Engine.stream_together`."""
    with closing(together):
        yield from (piece for _, piece in together if piece is not None)


def _log_answer(engine: str, pieces: int, prompt_tokens: int, snippets: int, started: float, first: float | None) -> None:
    """Lengths and timings of one answer (never its text)."""
    log.info(
        "%s generated %d pieces for a %d-token prompt (%d snippets) in %.2f s, first after %.2f s",
        engine, pieces, prompt_tokens, snippets, time.perf_counter() - started, (first or time.perf_counter()) - started,
    )  # fmt: skip


class Assistant:
    """Answers cases with one model version; retrieval from one guideline index."""

    def __init__(
        self,
        model_settings: ModelSettings | None = None,
        adapter: str | Path | None = "latest",
        runs_dir: Path = Path("runs"),
        index_dir: Path | None = None,
        retrieval: bool = True,
        engine: str | None = None,
    ) -> None:
        from federimed.serving.select import choose_engine

        self.settings = model_settings or ModelSettings()
        self.runs_dir = Path(runs_dir)
        self.index_dir = index_dir
        self.retrieval = retrieval
        self.version, self.notice = resolve_version(adapter, self.runs_dir)
        self.engine, engine_notice = choose_engine(self.settings, engine)
        self.notice = " ".join(n for n in (self.notice, engine_notice) if n) or None

    @property
    def model_version(self) -> ModelVersion:
        return self.version

    def model(self) -> Engine:
        """The generation engine of this version (llama.cpp or transformers, see `federimed.serving.select`),
        loaded once per process, version and engine; a checkpoint is exported for llama.cpp on first use."""
        adapter = str(self.version.adapter_dir) if self.version.adapter_dir else None
        with _LOADING:  # two doctors asking at once on a fresh server load it once
            return _load(self.settings.model_dump_json(), adapter, self.engine)

    def index(self) -> GuidelineIndex:
        """The guideline index: `index_dir` when given, else the default one (built on first use);
        loaded once per process and directory."""
        return _load_index(str(self.index_dir) if self.index_dir else None)

    def case_text(self, case: Case) -> str:
        """The de-identified case text: a bundle summarised by ingest, free text scrubbed."""
        if isinstance(case, (bytes, Path)):
            from ingest.errors import IngestError
            from ingest.pipeline import summarize_bundle

            try:
                return summarize_bundle(case)
            except IngestError as exc:
                raise CaseError(str(exc)) from exc
        text = case.strip()
        if not text:
            raise CaseError("the case is empty: paste the case or attach a FHIR bundle")
        if len(text) > MAX_CASE_CHARS:
            raise CaseError(
                f"the case is {len(text):,} characters long; the limit is {MAX_CASE_CHARS:,}. "
                "Shorten it to the facts that matter for this decision, or attach the FHIR bundle instead."
            )
        return scrub_free_text(text)

    def retrieve(self, case_text: str, k: int = DEFAULT_K) -> list[Snippet]:
        """The `k` guideline snippets that fit a de-identified case best."""
        return self.index().search(retrieval_query(case_text), k=k)

    def understand(self, case_text: str) -> Understood:
        """A de-identified case in the format the model was trained on: free text parsed into ingest's
        snapshot lines (`federimed.free_text`), a rendered case or bundle summary kept; the diagnosis is
        checked against those the newest cohort artefact releases."""
        from federimed.cohort import FORMAT, latest_artefact
        from federimed.free_text import understand

        artefact = latest_artefact(self.runs_dir)
        seen = artefact["diagnoses"].values() if artefact and artefact.get("format") == FORMAT else None
        return understand(case_text, seen)

    def prepare(self, case: Case, *, retrieval: bool | None = None, k: int = DEFAULT_K) -> Prepared:
        """De-identify and understand the case, retrieve snippets (unless retrieval is off), build the prompt."""
        return self.prepare_text(self.understand(self.case_text(case)).text, retrieval=retrieval, k=k)

    def prepare_text(self, case_text: str, *, retrieval: bool | None = None, k: int = DEFAULT_K) -> Prepared:
        """A de-identified, understood case with its snippets (unless retrieval is off) and prompt."""
        use_retrieval = self.retrieval if retrieval is None else retrieval
        snippets = self.retrieve(case_text, k) if use_retrieval else []
        return Prepared.of(case_text, snippets)

    def cohort(self, case_text: str) -> str | None:
        """"Patients like this in the federation": the released cohort counts for this de-identified case
        (`federimed.cohort`), as markdown; None when the case names no new diagnosis or no cohort artefact
        was made in the runs folder."""
        from federimed.cohort import for_case, latest_artefact

        artefact = latest_artefact(self.runs_dir)
        return for_case(artefact, case_text) if artefact is not None else None

    def prompt_ids(self, engine: Engine, prepared: Prepared, max_new_tokens: int) -> list[int]:
        """The prompt's token ids for `engine`; `CaseError` if it and the answer cannot fit the model."""
        from federimed.serving.backend import prompt_ids

        if max_new_tokens < 1:
            raise CaseError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = prompt_ids(engine.tokenizer, prepared.messages)
        if len(ids) + max_new_tokens > engine.context_length:
            raise CaseError(
                f"the prompt is {len(ids):,} tokens and {max_new_tokens} more were asked for; the model reads "
                f"at most {engine.context_length:,}. Shorten the case or ask for fewer tokens."
            )
        return ids

    def generate(
        self, prepared: Prepared, *, temperature: float = 0.0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> Iterator[str]:
        """Stream the answer to a prepared case, piece by piece: greedy when temperature is 0, by the path
        the chat's line and the evaluation take (so `ask`, the chat and the evaluation give the same answer)."""
        engine = self.model()
        ids = self.prompt_ids(engine, prepared, max_new_tokens)
        started = time.perf_counter()
        first = None
        pieces = 0
        if temperature > 0:
            stream = engine.stream(ids, max_new_tokens=max_new_tokens, temperature=temperature)
        else:
            stream = _alone(engine.stream_together([ids], max_new_tokens=[max_new_tokens], stopped=lambda seq: False))
        try:
            for piece in stream:
                first = first or time.perf_counter()
                pieces += 1
                yield piece
        finally:
            stream.close()  # a consumer that stops early stops the generation now
        _log_answer(engine.name, pieces, len(ids), len(prepared.snippets), started, first)

    async def astream(
        self, prepared: Prepared, *, temperature: float = 0.0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        line: AnswerLine | None = None, on_wait: OnWait | None = None,
    ) -> AsyncIterator[str]:  # fmt: skip
        """`generate` for async code, through `line`: the chat server's line, where doctors wait their turn
        (`on_wait` hears the place in line) and greedy answers may be decoded together, each the answer it
        gets alone; a line of its own when None. Stops generating when the consumer stops."""
        engine = await asyncio.to_thread(self.model)
        ids = self.prompt_ids(engine, prepared, max_new_tokens)
        started = time.perf_counter()
        first = None
        pieces = 0
        stream = (line or AnswerLine()).stream(
            engine, ids, max_new_tokens=max_new_tokens, temperature=temperature, on_wait=on_wait
        )
        async with aclosing(stream):  # a doctor who stops leaves the line now, not at garbage collection
            async for piece in stream:
                first = first or time.perf_counter()
                pieces += 1
                yield piece
        _log_answer(engine.name, pieces, len(ids), len(prepared.snippets), started, first)

    def stream(
        self,
        case: Case,
        *,
        retrieval: bool | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Iterator[str]:
        """Prepare the case and stream the answer."""
        yield from self.generate(
            self.prepare(case, retrieval=retrieval), temperature=temperature, max_new_tokens=max_new_tokens
        )

    def answer(
        self,
        case: Case,
        *,
        retrieval: bool | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Answer:
        """The whole answer to a case, with its snippets and model version."""
        started = time.perf_counter()
        prepared = self.prepare(case, retrieval=retrieval)
        prepared_at = time.perf_counter()
        text = "".join(self.generate(prepared, temperature=temperature, max_new_tokens=max_new_tokens))
        timings = {"prepare_s": prepared_at - started, "generate_s": time.perf_counter() - prepared_at}
        return Answer(text, prepared.snippets, self.version, prepared.case_text, timings)
