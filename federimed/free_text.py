"""A doctor's free-text case → the snapshot ingest renders, so the model reads what it was trained on.

"56-year-old man, BP 152/96 on two visits, no medication, new essential hypertension" becomes the lines
of `ingest.dialogues.snapshot_text` (one renderer for training and the chat): age and sex, the new
diagnosis, active conditions, current medications (as ingredients), allergies, and findings (blood
pressure, BMI, HbA1c, glucose, LDL, total cholesterol, eGFR). Diagnoses are matched to the condition names
training data uses (Synthea's, as ingest cleans them) through a table of common abbreviations and then by
fuzzy match; `Understood.summary` tells the doctor what was read, and says when the diagnosis is not one
the federation's released counts show (so the model has seen few or no such cases). The parser runs on
the scrubbed text only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from federimed.safety import vocabulary
from ingest.cases import Snapshot
from ingest.deidentify import age_band, age_text
from ingest.dialogues import snapshot_text

CONDITIONS = (
    "Acute bronchitis", "Otitis media", "Prediabetes", "Streptococcal sore throat", "Viral sinusitis",
    "Acute bacterial sinusitis", "Sinusitis", "Acute viral pharyngitis", "Laceration - injury", "Normal pregnancy",
    "Essential hypertension", "Fracture of bone", "Sprain of wrist", "Sprain of ankle", "Chronic pain",
    "Chronic intractable migraine without aura", "Migraine", "Impacted molars", "Injury of neck",
    "Concussion injury of brain", "Osteoarthritis of knee", "Osteoarthritis of hip", "Pneumonia", "Overdose",
    "Partial thickness burn", "Disease caused by severe acute respiratory syndrome coronavirus 2",
    "Child attention deficit disorder", "Fibromyalgia", "Cerebrovascular accident", "Atrial fibrillation",
    "Diabetes mellitus type 2", "Childhood asthma", "Asthma", "Seizure disorder", "Hyperlipidemia",
    "Hypertriglyceridemia", "Gingivitis", "Atopic dermatitis", "Perennial allergic rhinitis", "Major depressive disorder",
    "Bipolar disorder", "Open-angle glaucoma", "Chronic obstructive bronchitis", "Pulmonary emphysema",
    "Gastroesophageal reflux disease", "Alzheimer's disease", "Anemia", "Chronic kidney disease", "Chronic kidney disease stage 3",
    "Coronary heart disease", "Heart failure", "Obesity", "Urinary tract infection", "Cystitis",
    "Hypothyroidism", "Generalized anxiety disorder", "Acute pharyngitis", "Cellulitis",
)  # fmt: skip
"""Condition names as ingest renders them (Synthea's SNOMED displays without the semantic tag)."""

ABBREVIATIONS: dict[str, str] = {
    "htn": "Essential hypertension", "hypertension": "Essential hypertension",
    "high blood pressure": "Essential hypertension", "t2dm": "Diabetes mellitus type 2",
    "t2d": "Diabetes mellitus type 2", "dm2": "Diabetes mellitus type 2", "type 2 diabetes": "Diabetes mellitus type 2",
    "diabetes": "Diabetes mellitus type 2", "strep throat": "Streptococcal sore throat",
    "strep pharyngitis": "Streptococcal sore throat", "aom": "Otitis media", "ear infection": "Otitis media",
    "copd": "Chronic obstructive bronchitis", "af": "Atrial fibrillation", "afib": "Atrial fibrillation",
    "a-fib": "Atrial fibrillation", "cva": "Cerebrovascular accident", "stroke": "Cerebrovascular accident",
    "gerd": "Gastroesophageal reflux disease", "reflux": "Gastroesophageal reflux disease",
    "mdd": "Major depressive disorder", "depression": "Major depressive disorder", "oa knee": "Osteoarthritis of knee",
    "knee oa": "Osteoarthritis of knee", "knee osteoarthritis": "Osteoarthritis of knee",
    "adhd": "Child attention deficit disorder", "uti": "Urinary tract infection", "covid": 
    "Disease caused by severe acute respiratory syndrome coronavirus 2", "covid-19":
    "Disease caused by severe acute respiratory syndrome coronavirus 2", "high cholesterol": "Hyperlipidemia",
    "ckd": "Chronic kidney disease", "chf": "Heart failure", "cad": "Coronary heart disease",
    "bronchitis": "Acute bronchitis", "sinus infection": "Viral sinusitis", "hay fever": "Perennial allergic rhinitis",
    "eczema": "Atopic dermatitis", "anxiety": "Generalized anxiety disorder", "pre-diabetes": "Prediabetes",
    "sprained ankle": "Sprain of ankle", "sprained wrist": "Sprain of wrist", "concussion": "Concussion injury of brain",
    "laceration": "Laceration - injury", "lac": "Laceration - injury", "broken bone": "Fracture of bone",
    "fracture": "Fracture of bone", "fx": "Fracture of bone", "ankle sprain": "Sprain of ankle",
    "wrist sprain": "Sprain of wrist", "gad": "Generalized anxiety disorder",
    "viral pharyngitis": "Acute viral pharyngitis", "pharyngitis": "Acute viral pharyngitis",
}  # fmt: skip
"""Common abbreviations and lay names → condition names."""

FUZZY_CUTOFF = 0.8
_NEGATIVE_MEDS = re.compile(r"\b(?:no|not on any|not on|without)\s+(?:regular\s+|current\s+)?(?:medications?|meds|drugs)\b",
                            re.I)
_NO_ALLERGY = re.compile(r"\b(?:nkda|nka|no known (?:drug )?allergies|no allergies|allergies:\s*none)\b", re.I)
_STOP = r"(?=[.;\n]|,\s*(?:bp|bmi|hba1c|a1c|ldl|egfr|glucose|allerg|on |takes|taking|no |new |history)|$)"
_AGE = [
    re.compile(r"\b(\d{1,3})[\s-]*(?:years?|yrs?)[\s-]*old\b", re.I),
    re.compile(r"\b(\d{1,3})\s*(?:yo|y/o|y\.o\.|yrs?|years?)\b", re.I),
    re.compile(r"\bage[d]?\s*:?\s*(\d{1,3})\b", re.I),
    re.compile(r"\b(\d{1,3})\s*-?\s*[MF]\b"),
    re.compile(r"\b(?:man|woman|male|female|boy|girl|patient),?\s+(\d{1,3})\b", re.I),
]
_SEX_SHORT = re.compile(r"(?:\b\d{1,3}|yo|y/o|y\.o\.|years? old)\s*-?\s*([MF])\b")
_MALE = re.compile(r"\b(male|man|gentleman|boy|he|his|him|mr)\b", re.I)
_FEMALE = re.compile(r"\b(female|woman|lady|girl|she|her|mrs|ms|pregnant)\b", re.I)
_DIAGNOSIS = [
    re.compile(r"\bnew(?:ly)?\s+(?:diagnosed\s+(?:with\s+)?|diagnosis\s*(?:of\s*|:\s*)?|onset\s+(?:of\s+)?)?"
               rf"(?P<dx>[^.;,\n]+?){_STOP}", re.I),
    re.compile(rf"\bdiagnosed\s+with\s+(?P<dx>[^.;,\n]+?){_STOP}", re.I),
    re.compile(rf"\b(?:dx|diagnosis|assessment|impression)\s*:\s*(?P<dx>[^.;,\n]+?){_STOP}", re.I),
    re.compile(rf"\b(?:presents?|presenting)\s+with\s+(?P<dx>[^.;,\n]+?){_STOP}", re.I),
    re.compile(rf"(?:->|→|=>)\s*(?P<dx>[^.;,\n]+?){_STOP}"),
]
_HISTORY = re.compile(r"\b(?:history of|hx of|h/o|pmh\s*:?|past medical history\s*:?|known|background of|"
                      rf"comorbidities\s*:?|also has)\s+(?P<list>[^.;\n]+?){_STOP}", re.I)
_ALLERGY = re.compile(rf"\b(?:allergic to|allergy to|allergies\s*:?|allergy\s*:?)\s*(?P<list>[^.;\n]+?){_STOP}",
                      re.I)
_FINDINGS = [
    (re.compile(r"\b(?:bp|blood pressure)\s*(?:of|is|was|:)?\s*(\d{2,3})\s*/\s*(\d{2,3})", re.I), "BP {0}/{1} mmHg"),
    (re.compile(r"\bbmi\s*(?:of|is|was|:)?\s*(\d{1,2}(?:\.\d+)?)", re.I), "BMI {0}"),
    (re.compile(r"\b(?:hba1c|a1c|hemoglobin a1c)\s*(?:of|is|was|:)?\s*(\d{1,2}(?:\.\d+)?)", re.I), "HbA1c {0} %"),
    (re.compile(r"\b(?:fasting\s+)?(?:glucose|blood sugar)\s*(?:of|is|was|:)?\s*(\d{2,3})", re.I), "glucose {0} mg/dL"),
    (re.compile(r"\btotal chol(?:esterol)?\s*(?:of|is|was|:)?\s*(\d{2,3})", re.I), "total cholesterol {0} mg/dL"),
    (re.compile(r"\bldl(?:-c)?\s*(?:of|is|was|:)?\s*(\d{2,3})", re.I), "LDL {0} mg/dL"),
    (re.compile(r"\begfr\s*(?:of|is|was|:)?\s*(\d{1,3})", re.I), "eGFR {0} mL/min/1.73m2"),
]
_BY_LOWER = {name.lower(): name for name in CONDITIONS}
_SURFACES = [
    (re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.I), name, how)
    for word, (name, how) in sorted(
        ({n.lower(): (n, "exact") for n in CONDITIONS} | {a: (n, "abbreviation") for a, n in ABBREVIATIONS.items()}).items(),
        key=lambda item: len(item[0]), reverse=True,
    )
]  # fmt: skip
"""Each condition name and abbreviation as a whole-word pattern, longest first (for `mentions`)."""
_TREATED_WITH = re.compile(r"\s+(?:on|taking|takes|treated with|for)\s+", re.I)
_RENDERED = re.compile(r"(?m)^Patient: .+\n(?:New diagnosis|Active conditions): ")


@dataclass
class Match:
    """A condition as typed and the name it was matched to (None: no match)."""

    typed: str
    name: str | None
    how: str  # "exact", "abbreviation", "fuzzy 0.87" or "no match"

    @property
    def rendered(self) -> str:
        return self.name or self.typed


@dataclass
class Understood:
    """What the parser read from a case: the text the model reads, and what `summary` shows the doctor."""

    text: str
    snapshot: Snapshot | None = None  # None: kept as typed (already in the trained format, or too little found)
    diagnosis: Match | None = None
    unseen_diagnosis: bool = False  # not among the diagnoses the federation's released counts show

    @property
    def parsed(self) -> bool:
        """Whether the text was parsed and rendered anew."""
        return self.snapshot is not None


def match_condition(typed: str) -> Match:
    """The condition name `typed` stands for: exact, by abbreviation, or the closest by fuzzy match."""
    phrase = re.sub(r"\s+", " ", typed.strip(" -:").lower())
    phrase = re.sub(r"^(?:an?|the|mild|moderate|severe|acute onset of|suspected|probable)\s+", "", phrase)
    if phrase in _BY_LOWER:
        return Match(typed, _BY_LOWER[phrase], "exact")
    if phrase in ABBREVIATIONS:
        return Match(typed, ABBREVIATIONS[phrase], "abbreviation")
    contained = [n for n in _BY_LOWER if re.search(rf"\b{re.escape(n)}\b", phrase)]
    if contained:
        return Match(typed, _BY_LOWER[max(contained, key=len)], "exact")
    abbreviated = [a for a in ABBREVIATIONS if re.search(rf"\b{re.escape(a)}\b", phrase)]
    if abbreviated:
        return Match(typed, ABBREVIATIONS[max(abbreviated, key=len)], "abbreviation")
    scored = [(difflib.SequenceMatcher(None, phrase, n).ratio(), n) for n in _BY_LOWER]
    score, best = max(scored, default=(0.0, ""))
    if score >= FUZZY_CUTOFF:
        return Match(typed, _BY_LOWER[best], f"fuzzy {score:.2f}")
    return Match(typed, None, "no match")


def mentions(text: str) -> list[Match]:
    """Every condition named in `text` by its name or a listed abbreviation, in order (longest first where
    two overlap)."""
    found, taken = [], set()
    for pattern, name, how in _SURFACES:
        for m in pattern.finditer(text):
            span = set(range(m.start(), m.end()))
            if not span & taken:
                taken |= span
                found.append((m.start(), Match(m.group(0), name, how)))
    return [match for _, match in sorted(found, key=lambda f: f[0])]


def _items(text: str) -> list[str]:
    return [i.strip() for i in re.split(r",|\band\b|/|\+", text) if i.strip()]


def _age_sex(text: str) -> tuple[int | None, str | None]:
    age = next((int(m.group(1)) for pattern in _AGE if (m := pattern.search(text))), None)
    sex = None
    if short := _SEX_SHORT.search(text):
        sex = "male" if short.group(1) == "M" else "female"
    else:
        male, female = _MALE.search(text), _FEMALE.search(text)
        if male or female:
            sex = "male" if male and (not female or male.start() < female.start()) else "female"
    return age, sex


def _allergies(text: str) -> tuple[list[str], str]:
    """Listed allergies (typed, first letter capitalised) and the text without the allergy clauses."""
    if _NO_ALLERGY.search(text):
        return [], _NO_ALLERGY.sub(" ", text)
    found = []
    for m in _ALLERGY.finditer(text):
        items = (re.sub(r"\s*\([^)]*\)", "", i).strip() for i in _items(m.group("list")))  # "(rash)": a reaction
        found += [i[0].upper() + i[1:] for i in items if i and i.lower() not in ("none", "nil")]
    return found, _ALLERGY.sub(" ", text)


def _medications(text: str) -> list[str]:
    """Ingredients of the drugs the case says the patient takes (none when it says no medication)."""
    text = _NEGATIVE_MEDS.sub(" ", text)
    drugs: dict[str, None] = {}
    for clause in re.split(r"[.,;\n]", text):
        if not re.search(r"\b(?:no|not|stopped|avoid)\b", clause, re.I):
            drugs |= dict.fromkeys(sorted(vocabulary().extract(clause)))
    return list(drugs)


def understand(case_text: str, seen_diagnoses: Iterable[str] | None = None) -> Understood:
    """Parse a scrubbed free-text case into the trained format. A case already in that format, or one with
    no recognisable age or diagnosis, is kept as typed. `seen_diagnoses`: the diagnosis names of the
    federation's released counts (None: unknown, no claim is made)."""
    if _RENDERED.search(case_text):
        return Understood(case_text)
    age, sex = _age_sex(case_text)
    allergies, rest = _allergies(case_text)
    history = [m.group("list") for m in _HISTORY.finditer(rest)]
    typed = next((m.group("dx") for pattern in _DIAGNOSIS if (m := pattern.search(rest))), None)
    named = mentions(_HISTORY.sub(" ", rest))
    dx = match_condition(typed) if typed else None
    if named and (dx is None or dx.name is None):  # "atopic dermatitis, newly diagnosed": the named condition
        dx = named[0]
    if age is None or dx is None:
        return Understood(case_text)
    listed = [match_condition(_TREATED_WITH.split(i)[0]) for h in history for i in _items(h)]
    listed = [c for c in listed if c.name or not vocabulary().extract(c.typed)]  # "uses albuterol": a drug
    conditions = listed + named
    conditions = list({c.rendered.lower(): c for c in conditions if c.rendered.lower() != dx.rendered.lower()}.values())
    findings = []
    for pattern, template in _FINDINGS:
        if m := pattern.search(case_text):
            findings.append(template.format(*m.groups()))
    snapshot = Snapshot(
        age=age_text(age), age_band=age_band(age), sex=sex or "unknown sex", state=None,
        new_diagnoses=[dx.rendered], active_conditions=[c.rendered for c in conditions],
        current_medications=_medications(rest), allergies=allergies, findings=findings,
    )  # fmt: skip
    seen = {s.lower() for s in seen_diagnoses} if seen_diagnoses is not None else None
    unseen = seen is not None and dx.rendered.lower() not in seen
    return Understood(snapshot_text(snapshot), snapshot, dx, unseen)


def summary(understood: Understood) -> str:
    """Markdown for the case step: what was read, how the diagnosis was matched, and any warning."""
    if understood.snapshot is None or understood.diagnosis is None:
        return ""
    s, dx = understood.snapshot, understood.diagnosis
    how = "" if dx.how == "exact" else f" (from “{dx.typed.strip()}”, {dx.how})"
    rows = [
        ("Patient", f"{s.age}-year-old {s.sex}"),
        ("New diagnosis", f"{dx.rendered}{how}"),
        ("Active conditions", ", ".join(s.active_conditions) or "none"),
        ("Current medications", ", ".join(s.current_medications) or "none"),
        ("Allergies", ", ".join(s.allergies) or "none"),
        ("Findings", "; ".join(s.findings) or "none"),
    ]
    lines = ["**What I understood** (the model reads it in the format it was trained on):", "",
             "| field | read as |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if dx.name is None:
        lines += ["", f"⚠️ “{dx.typed.strip()}” matches no condition name the model was trained on: its answer "
                      "may be unreliable."]
    elif understood.unseen_diagnosis:
        lines += ["", f"⚠️ {dx.rendered} is not among the diagnoses the federation's counts show: the model has "
                      "seen few or no such cases in training."]
    return "\n".join(lines)
