"""De-identification of free text a doctor types or pastes (HIPAA Safe Harbor, best effort).

Structured records are de-identified by `ingest.deidentify` against the patient's known identifiers; a
pasted case has no such list, so this module removes what identifiers look like instead.
"""

from __future__ import annotations

import re
from datetime import date, datetime

from ingest.deidentify import REDACTED, UUID_RE, age_text, age_years, ago, span_text

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
_LABEL = r"(?i:\b(?:patient(?:'s)? )?(?:full )?{labels})\s*[:#]\s*"
# A name: the first word after the label and up to three more capitalised words or initials.
_NAME_RE = re.compile(_LABEL.format(labels="(?:name|surname|first name|last name)") + r"([^\s,;]+(?: [A-Z][\w'.-]*){0,3})")
# An address: up to the end of the line, a semicolon or the end of the sentence.
_ADDRESS_RE = re.compile(_LABEL.format(labels="(?:home )?(?:address|street)") + r"([^\n;]+?)(?=\.\s|[\n;]|$)")
# A number or handle: one token, plus following tokens that hold digits ("(617) 555-0142").
_NUMBER_RE = re.compile(
    _LABEL.format(
        labels="(?:MRN|medical record(?: number)?|record(?: number| no\\.?)?|account(?: number)?|insurance(?: id| number)?|"
        "member id|ssn|social security(?: number)?|phone|tel(?:ephone)?|mobile|fax|e-?mail|driver'?s licen[cs]e|passport)"
    )
    + r"([\w@.+()/-]+(?: [\w()/-]*\d[\w()/-]*)*)"
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

    Labelled values ("Name:", "MRN:", "Address:", ...: the name, number or address itself), titled names ("Mrs Smith"), SSNs, phone numbers,
    e-mail addresses, URLs, IP addresses, street addresses and UUIDs become "[REDACTED]"; exact dates
    become relative times ("3 months ago"), a birth date becomes an age; ages over 89 become "90+".
    """
    today = today or date.today()
    for pattern in (_NAME_RE, _ADDRESS_RE, _NUMBER_RE):
        text = pattern.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + REDACTED, text)
    text = _TITLE_NAME_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    for pattern in (_EMAIL_RE, _URL_RE, UUID_RE, _SSN_RE, _PHONE_RE, _IP_RE, _STREET_RE):
        text = pattern.sub(REDACTED, text)
    text = _replace_dates(text, today)
    text = _AGE_RE.sub(_cap_age, text)
    return _AGE_LABEL_RE.sub(lambda m: m.group(1) + age_text(int(m.group(2))), text)
