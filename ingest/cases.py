"""Treatment decisions → de-identified case snapshots and their targets.

A decision is an encounter where a diagnosis starts (a condition onset there that is a disorder,
not a social or administrative finding) and something is started for it: new medications (at the
encounter, or reason-linked to the diagnosis within ``LINK_WINDOW``), procedures done for it, or a
care plan. The snapshot is what a doctor saw at that moment (age band, sex, active conditions,
current medications, allergies, recent vitals and labs); the target is what was actually started.
Dates never leave this module: the snapshot carries ages and relative times only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from ingest.deidentify import Pseudonymizer, Scrubber, age_band, age_text, age_years, ago, identity_values, since
from ingest.timeline import CarePlan, Condition, Encounter, Medication, Observation, PatientTimeline, Procedure

LINK_WINDOW = timedelta(days=30)  # a reason-linked drug started this long after the diagnosis still belongs to it
RENEWAL_WINDOW = timedelta(days=400)  # Synthea renews chronic drugs yearly (~371 days): not a new start
ACUTE_WINDOW = timedelta(days=30)  # a one-off prescription without an end date counts as current this long
FINDINGS_WINDOW = timedelta(days=730)  # vitals and labs older than this are not "recent"
MAX_LIST = 8  # cap list lengths so a dialogue fits the 256-token training window

# Semantic tags that name a diagnosis (Synthea < 3.0 writes no tag at all: see ``is_diagnosis``).
DIAGNOSIS_TAGS = {"disorder"}
# Clinically meaningful SNOMED "(finding)"s that Synthea treats and that older exports leave untagged.
CLINICAL_FINDINGS = {
    "15777000",  # prediabetes
    "714628002",  # prediabetes
    "162864005",  # body mass index 30+ - obesity
    "82423001",  # chronic pain
    "278860009",  # chronic low back pain
    "1121000119107",  # chronic neck pain
    "80583007",  # severe anxiety (panic)
    "72892002",  # normal pregnancy
}
# Social determinants and administrative entries, recognised by their words where the tag is missing.
SOCIAL_RE = re.compile(
    r"employ|labor force|education|school|stress|housing|homeless|criminal|social|isolation|violence|abuse"
    r"|refugee|migrant|transport|military|armed forces|risk activity|misuses|alcohol|smokes|tobacco"
    r"|medication review|received .* (care|education)|awaiting|^suspected |^history of ",
    re.IGNORECASE,
)
_TAG_RE = re.compile(r"\s*\(([^()]*)\)\s*$")

# LOINC codes of the findings the snapshot reports, in display order.
SYSTOLIC, DIASTOLIC, BP_PANEL = "8480-6", "8462-4", "85354-9"
LABS = {
    "39156-5": ("BMI", ""),
    "4548-4": ("HbA1c", "%"),
    "2339-0": ("glucose", "mg/dL"),
    "2345-7": ("glucose", "mg/dL"),
    "2093-3": ("total cholesterol", "mg/dL"),
    "18262-6": ("LDL", "mg/dL"),
    "13457-7": ("LDL", "mg/dL"),
}

# Ingredient parsing of RxNorm descriptions.
_BRACKETS_RE = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_PREFIX_RE = re.compile(r"^(?:\d[\d.]*|NDA\d+|HR|ACTUAT|ML|Abuse-Deterrent)$", re.IGNORECASE)
_FORM_WORDS = {"oral", "tablet", "capsule", "injection", "solution", "suspension", "pack", "day", "chewable"}
_SALT_WORDS = {
    "hydrochloride", "hydrobromide", "bitartrate", "propionate", "potassium", "sodium", "calcium", "magnesium",
    "acetate", "maleate", "succinate", "tartrate", "citrate", "besylate", "mesylate", "sulfate", "fumarate",
    "phosphate", "bromide", "hyclate", "monohydrate", "dihydrate", "trihydrate", "anhydrous", "macrocrystals",
    "isophane", "regular", "human", "porcine", "axetil",
}  # fmt: skip
_INORGANIC = {"ferrous", "sodium", "potassium", "calcium", "magnesium", "zinc"}


def parse_ingredients(description: str) -> list[str]:
    """Lowercase ingredient names of an RxNorm drug description, brands, salts and forms removed.

    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet" → ["amoxicillin", "clavulanate"].
    """
    text = _BRACKETS_RE.sub(" ", description)
    parts = []
    for chunk in re.split(r"\s+/\s+", text):  # "A 5 MG / B 10 MG"; "A/B" only where no strength is given
        parts.extend([chunk] if re.search(r"\d", chunk) else chunk.split("/"))
    out: list[str] = []
    for part in parts:
        tokens = part.split()
        while tokens and _PREFIX_RE.match(tokens[0]):
            tokens.pop(0)
        words: list[str] = []
        for tok in tokens:
            if tok[0].isdigit() or tok.lower() in _FORM_WORDS:
                break
            words.append(re.sub(r"-[a-z]{4}$", "", tok.lower()))  # biologic suffix: hyaluronidase-oysk
        stripped = words[:1] + [w for w in words[1:] if w not in _SALT_WORDS]
        name = " ".join(words if " ".join(stripped) in _INORGANIC else stripped)
        if name and name not in out:
            out.append(name)
    return out


def semantic_tag(description: str) -> str | None:
    """The SNOMED semantic tag at the end of a description ("disorder", "finding", ...), if any."""
    m = _TAG_RE.search(description)
    return m.group(1).lower() if m else None


def clean_display(description: str) -> str:
    """A description without its trailing semantic tag, for compact snapshot text."""
    return " ".join(_TAG_RE.sub("", description).split())


def is_diagnosis(condition: Condition) -> bool:
    """True for disorders (and the few treated clinical findings); False for social/administrative findings.

    A "(disorder)" tag is trusted; "(finding)", "(situation)", "(person)" and other tags are not diagnoses
    unless listed in ``CLINICAL_FINDINGS``; an untagged description (Synthea < 3) is one unless its words
    name a social determinant.
    """
    if condition.code in CLINICAL_FINDINGS:
        return True
    tag = semantic_tag(condition.description)
    if tag is None:
        return not SOCIAL_RE.search(condition.description)
    return tag in DIAGNOSIS_TAGS


@dataclass(slots=True)
class Coded:
    code: str
    display: str


@dataclass(slots=True)
class Drug:
    code: str  # RxNorm
    display: str
    ingredients: list[str]


@dataclass(slots=True)
class Snapshot:
    """What the doctor saw at the decision, de-identified: no dates, no names, no source ids."""

    age: str  # "58" or "90+"
    age_band: str  # "50-59" or "90+"
    sex: str
    state: str | None
    new_diagnoses: list[str]
    active_conditions: list[str]
    current_medications: list[str]
    allergies: list[str]
    findings: list[str]


@dataclass(slots=True)
class Case:
    id: str  # salted hash of patient and encounter
    patient: str  # salted hash of the patient
    snapshot: Snapshot
    diagnosis: Coded
    drugs: list[Drug] = field(default_factory=list)
    procedures: list[Coded] = field(default_factory=list)
    careplans: list[Coded] = field(default_factory=list)
    careplan_activities: list[Coded] = field(default_factory=list)
    ended_days: int | None = None  # days from the diagnosis's onset to its end; None while it lasts

    def target(self) -> dict:
        """The structured target record of ``targets.*.jsonl``."""
        def as_dict(c: Coded) -> dict:
            return {"code": c.code, "display": c.display}

        return {
            "id": self.id,
            "patient": self.patient,
            "diagnosis": as_dict(self.diagnosis),
            "drugs": [{"code": d.code, "display": d.display, "ingredients": d.ingredients} for d in self.drugs],
            "procedures": [as_dict(c) for c in self.procedures],
            "careplans": [as_dict(c) for c in self.careplans],
            "careplan_activities": [as_dict(c) for c in self.careplan_activities],
            "ended_days": self.ended_days,
        }


def _day(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def _new_starts(meds: list[Medication], onsets: set[tuple[str | None, str]]) -> list[Medication]:
    """Medications that are new prescriptions, not renewals of the same RxNorm code.

    A drug is new when it was not prescribed within ``RENEWAL_WINDOW`` before, or when the condition
    it treats starts at the same encounter (a recurring acute illness, treated again). Only start
    times are used: FHIR medication requests carry no end date.
    """
    last: dict[str, datetime] = {}
    new = []
    for med in sorted(meds, key=lambda m: m.start):
        prev = last.get(med.code)
        if prev is None or med.start - prev > RENEWAL_WINDOW or (med.encounter_id, med.reason_code) in onsets:
            new.append(med)
        last[med.code] = med.start
    return new


def _dedupe(items: list, key) -> list:
    seen, out = set(), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


class _CaseBuilder:
    """Finds the decisions of one timeline and builds their cases."""

    def __init__(self, timeline: PatientTimeline, pseudonym: Pseudonymizer) -> None:
        self.t = timeline
        self.pseudonym = pseudonym
        self.scrub = Scrubber(identity_values(timeline.patient))
        self.diagnosis_codes = {c.code for c in timeline.conditions if is_diagnosis(c)}
        self.encounters = sorted(timeline.encounters, key=lambda e: e.start)
        self.by_encounter: dict[str, list[Condition]] = defaultdict(list)
        for cond in timeline.conditions:
            if cond.encounter_id and is_diagnosis(cond):
                self.by_encounter[cond.encounter_id].append(cond)
        onsets = {(c.encounter_id, c.code) for c in timeline.conditions}
        self.new_meds = _new_starts(timeline.medications, onsets)
        self.prescriptions = Counter(m.code for m in timeline.medications)
        self.procedures_at: dict[str | None, list[Procedure]] = defaultdict(list)
        for proc in timeline.procedures:
            self.procedures_at[proc.encounter_id].append(proc)
        self.careplans_at: dict[str | None, list[CarePlan]] = defaultdict(list)
        for plan in timeline.careplans:
            self.careplans_at[plan.encounter_id].append(plan)
        wanted = {SYSTOLIC, DIASTOLIC, BP_PANEL, *LABS}
        self.observations = [o for o in timeline.observations if o.code in wanted and o.value is not None]

    def build(self) -> list[Case]:
        decisions = [(e, self.by_encounter[e.id]) for e in self.encounters if self.by_encounter.get(e.id)]
        meds_at: dict[str, list[Medication]] = defaultdict(list)
        for med in self.new_meds:
            meds_at[med.encounter_id or ""].append(med)
        decision_ids = {e.id for e, _ in decisions}
        linked: dict[str, list[Medication]] = defaultdict(list)
        for med in self.new_meds:
            if med.encounter_id in decision_ids or not med.reason_code:
                continue
            for enc, dx in reversed(decisions):  # the latest decision before the drug that diagnosed its reason
                if enc.start <= med.start <= enc.start + LINK_WINDOW and med.reason_code in {c.code for c in dx}:
                    linked[enc.id].append(med)
                    break
        cases = []
        for enc, dx in decisions:
            case = self._case(enc, dx, meds_at.get(enc.id, []) + linked.get(enc.id, []))
            if case is not None:
                cases.append(case)
        return cases

    def _case(self, enc: Encounter, dx: list[Condition], meds: list[Medication]) -> Case | None:
        codes = {c.code for c in dx}

        def for_this(reason: str | None) -> bool:
            """A drug or plan for another, already known diagnosis does not treat this one."""
            return reason is None or reason in codes or reason not in self.diagnosis_codes

        meds = [m for m in meds if for_this(m.reason_code)]
        procs = [p for p in self.procedures_at.get(enc.id, []) if p.reason_code in codes]
        plans = [p for p in self.careplans_at.get(enc.id, []) if for_this(p.reason_code)]
        if not (meds or procs or plans):
            return None
        links = defaultdict(int)
        for reason in [m.reason_code for m in meds] + [p.reason_code for p in procs] + [p.reason_code for p in plans]:
            links[reason] += 1
        dx = _dedupe(dx, lambda c: c.code)
        primary = max(dx, key=lambda c: (links[c.code], semantic_tag(c.description) == "disorder"))
        drugs = [
            Drug(m.code, self.scrub(m.description), parse_ingredients(m.description))
            for m in _dedupe(sorted(meds, key=lambda m: m.start), lambda m: m.code)
        ]
        activities = _dedupe([a for p in plans for a in p.activities], lambda a: a[0])
        return Case(
            id=self.pseudonym.case(self.t.patient, enc.id),
            patient=self.pseudonym.patient(self.t.patient),
            snapshot=self.snapshot(enc, [primary] + [c for c in dx if c is not primary]),
            diagnosis=Coded(primary.code, self.scrub(primary.description)),
            drugs=drugs,
            procedures=[Coded(p.code, self.scrub(p.description)) for p in _dedupe(procs, lambda p: p.code)],
            careplans=[Coded(p.code, self.scrub(p.description)) for p in _dedupe(plans, lambda p: p.code)],
            careplan_activities=[Coded(code, self.scrub(text)) for code, text in activities],
            ended_days=None if primary.stop is None else (primary.stop - primary.start).days,
        )

    def snapshot(self, enc: Encounter, new_dx: list[Condition]) -> Snapshot:
        """The de-identified state of the patient at the start of ``enc``."""
        patient = self.t.patient
        today = enc.start.date()
        years = age_years(patient.birth_date, today)
        new_codes = {c.code for c in new_dx}
        active = [
            c
            for c in sorted(self.t.conditions, key=lambda c: c.start, reverse=True)
            if c.start <= today and (c.stop is None or c.stop > today) and is_diagnosis(c) and c.code not in new_codes
        ]
        meds = [
            m
            for m in sorted(self.t.medications, key=lambda m: m.start, reverse=True)
            if m.start < enc.start and m.encounter_id != enc.id and self._current(m, enc.start)
        ]
        med_names = _dedupe([n for m in meds for n in parse_ingredients(m.description)], str)
        allergies = sorted(  # drug allergies first: they constrain the treatment
            (a for a in self.t.allergies if _day(a.start) <= today and (a.stop is None or _day(a.stop) > today)),
            key=lambda a: a.category != "medication",
        )
        return Snapshot(
            age=age_text(years),
            age_band=age_band(years),
            sex=patient.gender,
            state=patient.state,
            new_diagnoses=[self.scrub(clean_display(c.description)) for c in new_dx][:3],
            active_conditions=[
                f"{self.scrub(clean_display(c.description))} ({since((today - c.start).days)})"
                for c in _dedupe(active, lambda c: c.code)
            ][:MAX_LIST],
            current_medications=med_names[:MAX_LIST],
            allergies=_dedupe([self.scrub(clean_display(a.description)) for a in allergies], str)[:MAX_LIST],
            findings=self.findings(enc),
        )

    def _current(self, med: Medication, at: datetime) -> bool:
        """Whether ``med`` is still taken at ``at``. FHIR requests carry no end: then a drug renewed before
        counts as current for ``RENEWAL_WINDOW`` after its latest start, a one-off drug for ``ACUTE_WINDOW``."""
        if med.stop is not None:
            return med.stop > at
        window = RENEWAL_WINDOW if self.prescriptions[med.code] > 1 else ACUTE_WINDOW
        return at - med.start <= window

    def findings(self, enc: Encounter) -> list[str]:
        """Latest blood pressure, BMI and labs up to the encounter, with how long ago they were taken."""
        latest: dict[str, Observation] = {}
        for obs in self.observations:
            if enc.start - FINDINGS_WINDOW <= obs.date <= enc.start:
                if obs.code not in latest or obs.date > latest[obs.code].date:
                    latest[obs.code] = obs
        out = []

        def when(obs: Observation) -> str:
            days = (enc.start.date() - obs.date.date()).days
            return "" if days <= 0 else f" ({ago(days)})"

        sys_, dia = latest.get(SYSTOLIC), latest.get(DIASTOLIC)
        if sys_ and dia:
            out.append(f"BP {_num(sys_.value)}/{_num(dia.value)} mmHg{when(sys_)}")
        elif BP_PANEL in latest and isinstance(latest[BP_PANEL].value, str):
            out.append(f"BP {latest[BP_PANEL].value} mmHg{when(latest[BP_PANEL])}")
        shown = set()
        for code, (name, unit) in LABS.items():
            obs = latest.get(code)
            if obs is None or name in shown or isinstance(obs.value, str):
                continue
            shown.add(name)
            out.append(f"{name} {_num(obs.value)}{(' ' + unit) if unit else ''}{when(obs)}")
        return out


def _num(value: float | str | None) -> str:
    if isinstance(value, float):
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return str(value)


def build_cases(timeline: PatientTimeline, pseudonym: Pseudonymizer) -> list[Case]:
    """All treatment-decision cases of one patient, de-identified, in time order."""
    return _CaseBuilder(timeline, pseudonym).build()


def current_snapshot(timeline: PatientTimeline, pseudonym: Pseudonymizer) -> Snapshot:
    """The de-identified snapshot at the patient's latest encounter (for a doctor's uploaded bundle)."""
    builder = _CaseBuilder(timeline, pseudonym)
    if not builder.encounters:
        raise ValueError("the record has no encounters")
    latest = builder.encounters[-1]
    return builder.snapshot(latest, builder.by_encounter.get(latest.id, []))
