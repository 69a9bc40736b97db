"""What the doctors' chat shows, kept out of the Chainlit app so it can be tested without a browser:
example cases, model-version choices, step and source texts, the answer footer and thread titles."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from federimed.assistant import BASE, Assistant, ModelVersion, available_versions, resolve_version
from federimed.checkpoints import CARE_MODES, LATEST
from federimed.config import ModelSettings
from federimed.retrieval import Snippet
from federimed.free_text import Understood, summary
from federimed.serving.turns import DEFAULT_TOGETHER

CASE_STEP = "De-identification"
SAFETY_AUTHOR = "Safety check"
QUEUE_AUTHOR = "Queue"
RETRIEVAL_STEP = "Guideline retrieval"
COHORT_STEP = "Patients like this in the federation"
BUNDLE_MIMES = {"application/json", "application/fhir+json"}
DISCLAIMER = (
    "Decision support only: not a substitute for clinical judgement. "
    "The model was fine-tuned on synthetic (Synthea) records, not on real patients."
)
_SOURCE_NAME_CHARS = 70

STARTERS = {
    "Hypertension": (
        "Patient: 58-year-old male\nNew diagnosis: Essential hypertension\n"
        "Active conditions: Prediabetes (since 2 years); Body mass index 30+ - obesity (since 3 years)\n"
        "Current medications: none\nAllergies: none\nRecent findings: BP 152/96 mmHg; BMI 31.4; HbA1c 6.1 %\n"
        "Question: What treatment should be started?"
    ),
    "Type 2 diabetes": (
        "Patient: 52-year-old female\nNew diagnosis: Diabetes mellitus type 2\n"
        "Active conditions: Essential hypertension (since 4 years); Hyperlipidemia (since 1 year)\n"
        "Current medications: lisinopril\nAllergies: none\n"
        "Recent findings: BP 134/84 mmHg; BMI 33.2; HbA1c 7.4 %; glucose 162 mg/dL\n"
        "Question: What treatment should be started?"
    ),
    "Strep throat": (
        "Patient: 9-year-old female\nNew diagnosis: Streptococcal sore throat\nActive conditions: none\n"
        "Current medications: none\nAllergies: none\nRecent findings: none\n"
        "Question: What treatment should be started?"
    ),
    "COPD exacerbation": (
        "Patient: 67-year-old male\nNew diagnosis: Chronic obstructive bronchitis\n"
        "Active conditions: Pulmonary emphysema (since 5 years); Essential hypertension (since 8 years)\n"
        "Current medications: amlodipine\nAllergies: none\nRecent findings: BP 128/78 mmHg; BMI 24.1\n"
        "Question: What treatment should be started?"
    ),
}


@dataclass(frozen=True)
class AppSettings:
    """Where the app finds its runs, index, users and history (from the environment `federimed chat` sets)."""

    model: ModelSettings
    runs_dir: Path
    index_dir: Path | None
    users_db: Path | None
    database_url: str | None
    baselines: bool = False
    """Offer evaluation baselines in the model menu (`federimed chat --baselines`)."""
    together: int = DEFAULT_TOGETHER
    """Most doctors' answers decoded together (`federimed chat --together`)."""

    @classmethod
    def from_env(cls) -> AppSettings:
        env = os.environ.get
        return cls(
            model=ModelSettings(base=env("FEDERIMED_BASE_MODEL") or ModelSettings().base),
            runs_dir=Path(env("FEDERIMED_RUNS_DIR") or "runs"),
            index_dir=Path(env("FEDERIMED_INDEX_DIR")) if env("FEDERIMED_INDEX_DIR") else None,
            users_db=Path(env("FEDERIMED_USERS_DB")) if env("FEDERIMED_USERS_DB") else None,
            database_url=env("FEDERIMED_DATABASE_URL") or None,
            baselines=env("FEDERIMED_CHAT_BASELINES") == "1",
            together=int(env("FEDERIMED_CHAT_TOGETHER") or DEFAULT_TOGETHER),
        )


@dataclass(frozen=True)
class Source:
    """A cited snippet as the chat shows it: a unique name (linked in the answer) and markdown content."""

    name: str
    content: str


@dataclass(frozen=True)
class VersionMenu:
    """The chat's model-version setting: label → version spec, and the spec chosen by default."""

    items: dict[str, str]
    default: str


def version_menu(runs_dir: Path, *, baselines: bool = False) -> VersionMenu:
    """Models meant for care, newest first, then the base model. The default is what `runs/latest` names
    (as `federimed ask` answers with): training points it at the federated model. Evaluation baselines
    (local-only, centralized) are listed only with `baselines`."""
    default, _ = resolve_version(LATEST, runs_dir)
    shown = [
        v for v in available_versions(runs_dir)
        if v.adapter_dir is not None and (baselines or v.mode in CARE_MODES or v.label == default.label)
    ]  # fmt: skip
    items: dict[str, str] = {}
    for version in [*shown, ModelVersion(BASE)]:
        label = menu_label(version, default=version.label == default.label)
        items[label if label not in items else f"{label} · {version.label}"] = version.label
    return VersionMenu(items, default.label)


def menu_label(version: ModelVersion, *, default: bool = False) -> str:
    """How the menu names a version: kind, round, hospitals, date and ε, so that a doctor can tell them apart."""
    if version.adapter_dir is None:
        label = "Base model (not fine-tuned)"
    else:
        kind = "Federated" if version.mode in CARE_MODES else f"Evaluation baseline: {version.mode}"
        parts = [kind, f"round {version.rounds}"]
        if version.hospitals:
            n = len(version.hospitals)
            parts.append(f"{n} hospital{'' if n == 1 else 's'} ({', '.join(version.hospitals)})")
        if version.created:
            parts.append(version.created.replace("T", " ")[:16])
        if version.epsilon is not None:
            parts.append(f"DP ε {version.epsilon:.1f}")
        label = " · ".join(parts)
    return f"{label} (default)" if default else label


def assistant_for(spec: str, settings: AppSettings) -> Assistant:
    """An assistant answering with version `spec` under the app's settings."""
    return Assistant(settings.model, adapter=spec, runs_dir=settings.runs_dir, index_dir=settings.index_dir)


def is_bundle(name: str, mime: str | None) -> bool:
    """Whether an upload looks like a FHIR bundle (JSON)."""
    return (mime or "").split(";")[0].strip() in BUNDLE_MIMES or name.lower().endswith(".json")


def unsupported_upload(names: list[str]) -> str:
    return (
        f"**Cannot read {', '.join(names)}:** attach one FHIR R4 bundle (a `.json` file with the patient's "
        "record), or paste the case as text."
    )


def case_summary(understood: Understood, *, from_bundle: bool) -> str:
    """The step text showing the doctor what the model will read and, for free text, what was understood."""
    origin = "the uploaded FHIR bundle" if from_bundle else "your message"
    text = (
        f"What the model reads from {origin}, with names, exact dates, addresses, contact details and record "
        f"numbers removed:\n\n```text\n{understood.text}\n```"
    )
    return f"{summary(understood)}\n\n{text}" if understood.parsed else text


def queue_text(ahead: int) -> str:
    """What a waiting doctor sees while others are being answered."""
    return f"Waiting for the model: {ahead} doctor{'' if ahead == 1 else 's'} ahead of you."


def retrieval_summary(snippets: list[Snippet]) -> str:
    """The retrieval step's text: each snippet with its source, licence and similarity."""
    if not snippets:
        return "No guideline passage found for this case."
    lines = []
    for n, s in enumerate(snippets, 1):
        lines.append(f"**[{n}] {_heading(s)}** · similarity {s.score:.2f}  \n{s.source} · {s.licence}")
    return "\n\n".join(lines)


def _heading(snippet: Snippet) -> str:
    return snippet.title if not snippet.section or snippet.section == snippet.title else f"{snippet.title} — {snippet.section}"


def source_elements(snippets: list[Snippet]) -> list[Source]:
    """One side-panel source per snippet, named "[n] Title — Section" (unique: numbered)."""
    sources = []
    for n, s in enumerate(snippets, 1):
        heading = _heading(s)
        if len(heading) > _SOURCE_NAME_CHARS:
            heading = heading[: _SOURCE_NAME_CHARS - 1].rstrip() + "…"
        link = f"[{s.source}]({s.url})" if s.url else s.source
        content = f"### Source {n}: {_heading(s)}\n\n{s.text.strip()}\n\n---\n{link} · licence: {s.licence} · similarity {s.score:.2f}"
        sources.append(Source(name=f"Source {n}: {heading}", content=content))
    return sources


def with_footer(answer: str, sources: list[Source], version: ModelVersion) -> str:
    """The answer followed by its sources (each name becomes a link in Chainlit) and the footer."""
    parts = [answer.strip() or "_(The model gave no answer.)_"]
    if sources:
        parts.append("**Guideline sources**\n" + "\n".join(f"- {s.name}" for s in sources))
    parts.append(f"---\n_Model: {version.describe()}. {DISCLAIMER}_")
    return "\n\n".join(parts)


def thread_title(case_text: str) -> str:
    """A history title from the de-identified case: the new diagnosis, or its first line."""
    match = re.search(r"(?im)^new diagnosis:\s*(.+)$", case_text)
    patient = re.search(r"(?im)^patient:\s*(.+)$", case_text)
    if match and match.group(1).strip().lower() != "none":
        title = match.group(1).strip() + (f" · {patient.group(1).strip()}" if patient else "")
    else:
        title = next((line.strip() for line in case_text.splitlines() if line.strip()), "Case")
    return title if len(title) <= 80 else title[:79].rstrip() + "…"

