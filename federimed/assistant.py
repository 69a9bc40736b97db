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
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federimed.config import ModelSettings
from federimed.retrieval import Snippet
from ingest.deidentify import REDACTED, UUID_RE, age_text, age_years, ago, span_text
from ingest.dialogues import QUESTION, SYSTEM_PROMPT

if TYPE_CHECKING:
    from federimed.checkpoints import Version
    from federimed.retrieval import GuidelineIndex

log = logging.getLogger(__name__)

MAX_CASE_CHARS = 6000
"""Longest case text accepted (a compact case is a few hundred characters)."""
SNIPPET_CHARS = 400
"""Each guideline snippet is cut to about this many characters in the prompt (the model is small)."""
DEFAULT_K = 3
DEFAULT_MAX_NEW_TOKENS = 160
BASE = "base"

Case = str | Path | bytes
"""Free text (str) or a FHIR bundle (a file path or its bytes)."""


class CaseError(ValueError):
    """A case cannot be answered as given (empty, too long, unreadable bundle)."""


# ---------------------------------------------------------------- de-identification of free text

_MONTHS = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
_DATE_RES = [
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), ("y", "m", "d")),
    (re.compile(r"\b(\d{4})/(\d{1,2})/(\d{1,2})\b"), ("y", "m", "d")),
    (re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b"), ("m", "d", "y")),
    (re.compile(r"\b(\d{1,2})\.(\d{1,2})\.(\d{4})\b"), ("d", "m", "y")),
    (re.compile(rf"\b({_MONTHS})\.? (\d{{1,2}})(?:st|nd|rd|th)?,? (\d{{4}})\b", re.IGNORECASE), ("mon", "d", "y")),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)? ({_MONTHS})\.?,? (\d{{4}})\b", re.IGNORECASE), ("d", "mon", "y")),
]
_BIRTH_RE = re.compile(r"\b(?:DOB|D\.O\.B\.|date of birth|born(?: on)?)\s*:?\s*$", re.IGNORECASE)
_LABELLED_RE = re.compile(
    r"(?i)(\b(?:patient(?:'s)? )?(?:full )?(?:name|surname|first name|last name|address|street|"
    r"MRN|medical record(?: number)?|record(?: number| no\.?)?|account(?: number)?|insurance(?: id| number)?|"
    r"member id|ssn|social security(?: number)?|phone|tel(?:ephone)?|mobile|fax|e-?mail|"
    r"driver'?s licen[cs]e|passport)\s*[:#]\s*)([^\n;|]+)"
)
_TITLE_NAME_RE = re.compile(r"\b(Mr|Mrs|Ms|Miss|Mx|Dr)\.? ([A-Z][a-z'-]+(?: [A-Z][a-z'-]+)?)")
_SSN_RE = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_PHONE_RE = re.compile(r"(?<![\w/])(?:\+?1[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]\d{4}\b")
_EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_URL_RE = re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.IGNORECASE)
_IP_RE = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_STREET_RE = re.compile(
    r"\b\d{1,6} (?:[A-Z][a-z]+ ){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|"
    r"Way|Place|Pl|Terrace|Circle|Suite)\b\.?(?: (?:Apt|Unit|Suite)\.? ?\w+)?"
)
_AGE_RE = re.compile(r"\b(\d{2,3})(?=[- ]?(?:years?[- ]old|y/?o\b|yo\b))", re.IGNORECASE)
_AGE_LABEL_RE = re.compile(r"\b(age[d]?:?\s*)(\d{2,3})\b", re.IGNORECASE)


def _parse_date(match: re.Match, order: tuple[str, ...]) -> date | None:
    parts = dict(zip(order, match.groups()))
    try:
        month = int(parts["m"]) if "m" in parts else _month_number(parts["mon"])
        return date(int(parts["y"]), month, int(parts["d"]))
    except ValueError:
        return None


def _month_number(name: str) -> int:
    return datetime.strptime(name[:3].title(), "%b").month


def _relative(day: date, today: date) -> str:
    days = (today - day).days
    return ago(days) if days >= 0 else f"in {span_text(-days)}"


def _replace_dates(text: str, today: date) -> str:
    for pattern, order in _DATE_RES:

        def repl(match: re.Match, order: tuple[str, ...] = order) -> str:
            day = _parse_date(match, order)
            if day is None:
                return match.group(0)
            if _BIRTH_RE.search(text[: match.start()].rsplit("\n", 1)[-1]):
                return f"(age {age_text(age_years(day, today))})"
            return _relative(day, today)

        text = pattern.sub(repl, text)
    return text


def _cap_age(match: re.Match) -> str:
    return age_text(int(match.group(0)))


def scrub_free_text(text: str, today: date | None = None) -> str:
    """Remove obvious identifiers from a doctor's free-text case (HIPAA Safe Harbor, best effort).

    Labelled values ("Name:", "MRN:", "Address:", ...), titled names ("Mrs Smith"), SSNs, phone numbers,
    e-mail addresses, URLs, IP addresses, street addresses and UUIDs become "[REDACTED]"; exact dates
    become relative times ("3 months ago"), a birth date becomes an age; ages over 89 become "90+".
    """
    today = today or date.today()
    text = _LABELLED_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _TITLE_NAME_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    for pattern in (_EMAIL_RE, _URL_RE, UUID_RE, _SSN_RE, _PHONE_RE, _IP_RE, _STREET_RE):
        text = pattern.sub(REDACTED, text)
    text = _replace_dates(text, today)
    text = _AGE_RE.sub(_cap_age, text)
    return _AGE_LABEL_RE.sub(lambda m: m.group(1) + age_text(int(m.group(2))), text)


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
    """What to search the guidelines for: the new diagnosis where the case names one, else the whole case."""
    match = re.search(r"(?im)^new diagnosis:\s*(.+)$", case_text)
    if match and match.group(1).strip().lower() != "none":
        return f"{match.group(1).strip()} treatment"
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

    def describe(self) -> str:
        """One line for the footer: "RUN/round-3 · federated · 3 rounds · 3 hospitals (a, b, c) · 1,204 examples"."""
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
        return " · ".join(parts)


def _version_of(info: Version) -> ModelVersion:
    return ModelVersion(
        label=f"{info.run_id}/round-{info.round}",
        adapter_dir=Path(info.path),
        mode=info.mode,
        rounds=info.round,
        hospitals=tuple(info.hospitals),
        examples=info.examples,
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
        if str(spec) == "latest" and not list_versions(runs_dir):
            return ModelVersion(BASE), f"No federated run in {runs_dir} yet: answering with the base model."
        raise
    for info in list_versions(runs_dir):
        if Path(info.path).resolve() == Path(path).resolve():
            return _version_of(info), None
    return ModelVersion(str(path), adapter_dir=Path(path)), None


@lru_cache(maxsize=4)
def _load(settings_json: str, adapter_dir: str | None) -> tuple[Any, Any]:
    from federimed.model import load_for_inference

    started = time.perf_counter()
    loaded = load_for_inference(ModelSettings.model_validate_json(settings_json), Path(adapter_dir) if adapter_dir else None)
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    return loaded


@lru_cache(maxsize=4)
def _load_index(index_dir: str | None) -> GuidelineIndex:
    from federimed.retrieval import GuidelineIndex, ensure_default_index

    return GuidelineIndex.load(Path(index_dir)) if index_dir else ensure_default_index()


_GENERATE_LOCK = threading.Lock()  # one generation at a time: concurrent ones only fight for the cores


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


class Assistant:
    """Answers cases with one model version; retrieval from one guideline index."""

    def __init__(
        self,
        model_settings: ModelSettings | None = None,
        adapter: str | Path | None = "latest",
        runs_dir: Path = Path("runs"),
        index_dir: Path | None = None,
        retrieval: bool = True,
    ) -> None:
        self.settings = model_settings or ModelSettings()
        self.runs_dir = Path(runs_dir)
        self.index_dir = index_dir
        self.retrieval = retrieval
        self.version, self.notice = resolve_version(adapter, self.runs_dir)

    @property
    def model_version(self) -> ModelVersion:
        return self.version

    def model(self) -> tuple[Any, Any]:
        """The (model, tokenizer) of this version, loaded once per process and version."""
        adapter = str(self.version.adapter_dir) if self.version.adapter_dir else None
        return _load(self.settings.model_dump_json(), adapter)

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

    def prepare(self, case: Case, *, retrieval: bool | None = None, k: int = DEFAULT_K) -> Prepared:
        """De-identify the case, retrieve snippets (unless retrieval is off) and build the prompt."""
        case_text = self.case_text(case)
        use_retrieval = self.retrieval if retrieval is None else retrieval
        snippets = self.retrieve(case_text, k) if use_retrieval else []
        return Prepared.of(case_text, snippets)

    def generate(
        self, prepared: Prepared, *, temperature: float = 0.0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> Iterator[str]:
        """Stream the answer to a prepared case, piece by piece (greedy when temperature is 0)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if max_new_tokens < 1:
            raise CaseError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        model, tokenizer = self.model()
        inputs = tokenizer.apply_chat_template(
            prepared.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit = _context_length(model, tokenizer)
        if prompt_tokens + max_new_tokens > limit:
            raise CaseError(
                f"the prompt is {prompt_tokens:,} tokens and {max_new_tokens} more were asked for; the model reads "
                f"at most {limit:,}. Shorten the case or ask for fewer tokens."
            )
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stop.is_set()

        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 0.95}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with _GENERATE_LOCK:
                    model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        pad_token_id=tokenizer.pad_token_id,
                        **sampling,
                    )
            except BaseException as exc:  # re-raised in the consumer's thread below
                errors.append(exc)
                streamer.end()

        started = time.perf_counter()
        first = None
        pieces = 0
        thread = threading.Thread(target=run, name="federimed-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    first = first or time.perf_counter()
                    pieces += 1
                    yield piece
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
        elapsed = time.perf_counter() - started
        log.info(
            "generated %d pieces for a %d-token prompt (%d snippets) in %.2f s, first after %.2f s",
            pieces, prompt_tokens, len(prepared.snippets), elapsed, (first or time.perf_counter()) - started,
        )  # fmt: skip

    async def astream(
        self, prepared: Prepared, *, temperature: float = 0.0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> AsyncIterator[str]:
        """`generate` for async code: runs in a worker thread; stops generating when the consumer stops."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def pump() -> None:
            try:
                pieces = self.generate(prepared, temperature=temperature, max_new_tokens=max_new_tokens)
                for piece in pieces:
                    if cancelled.is_set():
                        pieces.close()
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as exc:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, pump)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(worker)

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


def _context_length(model: Any, tokenizer: Any) -> int:
    """How many tokens the model reads at most."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min(v for v in limits if isinstance(v, int) and 0 < v < 10**7)
