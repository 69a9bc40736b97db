"""Canary records for the memorisation audit: unique fake patients whose answer hides a secret.

A canary is a case in the real dialogue format (`ingest.dialogues`) with a rare combination of
conditions that occurs nowhere in the hospitals' data; its answer names a secret: an ordered pair of
rare drugs drawn from `SECRET_DRUGS`. Alternatives replace the secret with other draws from the same
pool, so they have exactly the same format. Planted canaries are appended `copies` times to one
hospital's training file (in a copy of its data); controls are made the same way and never planted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ingest.cases import Case, Coded, Drug, Snapshot
from ingest.dialogues import case_prompt, dialogue

SECRET_SIZE = 2
"""Drugs in a secret: ordered pairs of the pool give len(pool)·(len(pool)−1) possible secrets."""
COPIED_FILES = ("manifest.json", "train.jsonl", "heldout.jsonl")
"""What a federated client needs from a hospital directory (never its .salt or targets)."""

# Rare diseases that Synthea does not simulate (any that a data set does contain are dropped).
RARE_CONDITIONS = (
    "Fabry disease", "Gaucher disease", "Wilson disease", "Pompe disease", "Erdheim-Chester disease",
    "Castleman disease", "Takayasu arteritis", "Kikuchi-Fujimoto disease", "Whipple disease", "Behcet disease",
    "Acute intermittent porphyria", "Niemann-Pick disease type C", "Hereditary angioedema",
    "Paroxysmal nocturnal hemoglobinuria", "Stiff person syndrome", "Refsum disease", "Alkaptonuria",
    "Moyamoya disease", "Susac syndrome", "Tyrosinemia type 1", "Cystinosis", "Hypophosphatasia",
    "Fibrodysplasia ossificans progressiva", "Langerhans cell histiocytosis", "Dercum disease",
    "Schnitzler syndrome", "Rosai-Dorfman disease", "Adult-onset Still disease",
    "Hemophagocytic lymphohistiocytosis", "Primary hyperoxaluria",
)  # fmt: skip
COMMON_CONDITIONS = ("Essential hypertension", "Prediabetes", "Hyperlipidemia", "Anemia", "Chronic sinusitis")
# Rare single-ingredient drugs (orphan drugs, biologics) that Synthea does not prescribe.
SECRET_DRUGS = (
    "miglustat", "eliglustat", "trientine", "penicillamine", "migalastat", "siltuximab", "vemurafenib", "dapsone",
    "pyridostigmine", "riluzole", "nitisinone", "hemin", "givosiran", "eculizumab", "ravulizumab", "icatibant",
    "lanadelumab", "anakinra", "canakinumab", "thalidomide", "cladribine", "tetrabenazine", "deflazacort",
    "risdiplam", "burosumab", "cysteamine", "palovarotene", "emapalumab", "sirolimus", "tocilizumab",
    "agalsidase", "imiglucerase", "alglucosidase", "cerliponase", "selumetinib", "avacopan", "pegcetacoplan",
    "iptacopan", "lumasiran", "tafamidis",
)  # fmt: skip


class CanaryError(ValueError):
    """Canaries cannot be made or planted as asked."""


@dataclass(frozen=True)
class Canary:
    """One fake patient: a rare case whose answer names `secret`; planted `copies` times (0: a control)."""

    id: str
    copies: int
    age: int
    sex: str
    diagnosis: str
    history: tuple[str, ...]
    secret: tuple[str, ...]

    @property
    def planted(self) -> bool:
        return self.copies > 0

    def prompt(self) -> list[dict[str, str]]:
        """System and user messages of the canary's case (what a doctor would ask)."""
        return case_prompt(self._case(self.secret).snapshot)

    def dialogue(self, secret: Sequence[str] | None = None) -> dict:
        """The canary as a training dialogue; `secret` swaps in an alternative of the same format."""
        return dialogue(self._case(tuple(secret) if secret is not None else self.secret))

    def _case(self, secret: tuple[str, ...]) -> Case:
        snapshot = Snapshot(
            age=str(self.age), age_band=f"{self.age // 10 * 10}-{self.age // 10 * 10 + 9}", sex=self.sex, state=None,
            new_diagnoses=[self.diagnosis], active_conditions=list(self.history), current_medications=[],
            allergies=[], findings=[],
        )
        drugs = [Drug(code="", display=name, ingredients=[name]) for name in secret]
        return Case(id=self.id, patient=f"{self.id}-patient", snapshot=snapshot,
                    diagnosis=Coded(code="", display=self.diagnosis), drugs=drugs)


@dataclass(frozen=True)
class CanarySet:
    """The canaries of one audit, the secret pool they were drawn from and the candidates left out."""

    canaries: tuple[Canary, ...]
    pool: tuple[str, ...]
    excluded: tuple[str, ...]
    """Candidate conditions and drugs dropped because the hospitals' data already mention them."""
    seed: int

    @property
    def planted(self) -> list[Canary]:
        return [c for c in self.canaries if c.planted]

    @property
    def controls(self) -> list[Canary]:
        return [c for c in self.canaries if not c.planted]

    def alternatives(self, canary: Canary, count: int) -> list[tuple[str, ...]]:
        """`count` distinct secrets of the same format as `canary.secret`, never the secret itself (seeded)."""
        space = [s for s in itertools.permutations(self.pool, len(canary.secret)) if s != canary.secret]
        if count > len(space):
            raise CanaryError(f"asked for {count} alternatives but only {len(space)} secrets of this format exist")
        return random.Random(f"{self.seed}:{canary.id}").sample(space, count)

    def save(self, path: Path) -> Path:
        data = {"seed": self.seed, "pool": self.pool, "excluded": self.excluded,
                "canaries": [asdict(c) for c in self.canaries]}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> CanarySet:
        data = json.loads(path.read_text())
        canaries = tuple(
            Canary(**(c | {"history": tuple(c["history"]), "secret": tuple(c["secret"])})) for c in data["canaries"]
        )
        return cls(canaries, tuple(data["pool"]), tuple(data["excluded"]), data["seed"])


def make_canaries(
    real_dialogues: Iterable[dict], *, copies: Sequence[int] = (1, 4, 16), per_level: int = 2, controls: int = 3,
    seed: int = 0,
) -> CanarySet:
    """Canaries that collide with nothing in `real_dialogues`: `per_level` planted canaries for each
    number of `copies`, and `controls` never-planted ones. The same seed and data give the same canaries.

    Every canary has its own rare conditions and secret drugs (no two canaries share one), so a
    control's exposure is not lifted by a planted canary that resembles it.
    """
    if any(k < 1 for k in copies) or per_level < 1 or controls < 0:
        raise CanaryError("copies must be ≥ 1, per_level ≥ 1 and controls ≥ 0")
    text, ids = _real_text(real_dialogues)
    excluded = tuple(term for term in (*RARE_CONDITIONS, *SECRET_DRUGS) if term.lower() in text)
    conditions = [c for c in RARE_CONDITIONS if c not in excluded]
    pool = tuple(d for d in SECRET_DRUGS if d not in excluded)
    levels = [k for k in copies for _ in range(per_level)] + [0] * controls
    if len(conditions) < 2 * len(levels) or len(pool) < SECRET_SIZE * len(levels) + 2:
        raise CanaryError(
            f"{len(levels)} canaries need {2 * len(levels)} rare conditions and over {SECRET_SIZE * len(levels)} "
            f"secret drugs that the data never mention; only {len(conditions)} and {len(pool)} are left "
            f"(excluded because the data mention them: {', '.join(excluded) or 'none'})"
        )
    rng = random.Random(seed)
    picked_conditions = rng.sample(conditions, 2 * len(levels))
    picked_drugs = rng.sample(pool, SECRET_SIZE * len(levels))
    canaries = []
    for i, k in enumerate(levels):
        canary_id = "canary-" + hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:12]
        if canary_id in ids:
            raise CanaryError(f"canary id {canary_id} collides with a real dialogue id")
        canaries.append(Canary(
            id=canary_id, copies=k, age=rng.randint(25, 85), sex=rng.choice(("female", "male")),
            diagnosis=picked_conditions[2 * i],
            history=(f"{picked_conditions[2 * i + 1]} (since {rng.randint(1, 15)} years)",
                     f"{rng.choice(COMMON_CONDITIONS)} (since {rng.randint(1, 15)} years)"),
            secret=tuple(picked_drugs[SECRET_SIZE * i: SECRET_SIZE * (i + 1)]),
        ))
    return CanarySet(tuple(canaries), pool, excluded, seed)


def _real_text(dialogues: Iterable[dict]) -> tuple[str, set[str]]:
    """All message text of `dialogues`, lower-cased, and their ids."""
    parts, ids = [], set()
    for d in dialogues:
        ids.add(d["id"])
        parts.extend(m["content"].lower() for m in d["messages"])
    return "\n".join(parts), ids


def hospital_dialogues(hospitals: Sequence[Path]) -> Iterable[dict]:
    """Every training and held-out dialogue of the given hospital directories."""
    from federimed.training import load_dialogues

    for hospital in hospitals:
        for name in ("train.jsonl", "heldout.jsonl"):
            if (hospital / name).is_file():
                yield from load_dialogues(hospital / name)


def plant(canaries: CanarySet, hospitals: Sequence[Path], target: str, dest: Path) -> list[Path]:
    """Copy each hospital's `COPIED_FILES` to `dest/<name>/` and append every planted canary, `copies`
    times, to `dest/<target>/train.jsonl`. The source directories are only read. Returns the copies."""
    names = [h.name for h in hospitals]
    if target not in names:
        raise CanaryError(f"hospital {target!r} is not one of {', '.join(names)}")
    copies = []
    for hospital in hospitals:
        out = dest / hospital.name
        if out.resolve() == hospital.resolve():
            raise CanaryError(f"{dest} is the hospitals' own data directory: canaries are planted in a copy only")
        out.mkdir(parents=True)
        for name in COPIED_FILES:
            if (hospital / name).is_file():
                shutil.copyfile(hospital / name, out / name)
        copies.append(out)
    train_file = dest / target / "train.jsonl"
    ends_open = train_file.stat().st_size > 0 and not train_file.read_bytes().endswith(b"\n")
    with open(train_file, "a", encoding="utf-8") as train:
        train.write("\n" if ends_open else "")
        for canary in canaries.planted:
            line = canary.dialogue()
            train.writelines(json.dumps(line | {"id": f"{canary.id}-{j}"}) + "\n" for j in range(canary.copies))
    return copies
