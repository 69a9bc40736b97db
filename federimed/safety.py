"""Safety checks on an answer: a drug it proposes that the case's allergies rule out (the drug itself, its
class, or a class known to cross-react), or that repeats what the patient already takes (the same
ingredient, or a second drug of the same class).

The case is read from the lines ingest renders ("Allergies: a; b", "Current medications: x, y"); the
answer's drugs are the ingredients `DrugVocabulary` finds in it, skipping clauses that say to avoid or
stop a drug (a clause that only mentions a drug is checked: a warning too many beats one too few). Classes are a short hand-made table of the classes that matter
most for allergies and duplicate therapy; a drug outside it is checked by ingredient only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from federimed.evaluation.drugs import DrugVocabulary

DRUG_CLASSES: dict[str, frozenset[str]] = {
    "penicillins": frozenset({"amoxicillin", "ampicillin", "penicillin v", "penicillin g", "piperacillin",
                              "dicloxacillin", "nafcillin", "oxacillin"}),
    "cephalosporins": frozenset({"cephalexin", "cefadroxil", "cefazolin", "cefuroxime", "cefaclor", "cefprozil",
                                 "cefdinir", "cefixime", "cefpodoxime", "ceftriaxone", "cefotaxime", "ceftazidime",
                                 "cefepime"}),
    "carbapenems": frozenset({"meropenem", "imipenem", "ertapenem"}),
    "sulfonamide antibiotics": frozenset({"sulfamethoxazole", "sulfadiazine", "sulfasalazine"}),
    "macrolides": frozenset({"azithromycin", "clarithromycin", "erythromycin"}),
    "fluoroquinolones": frozenset({"ciprofloxacin", "levofloxacin", "moxifloxacin", "ofloxacin"}),
    "tetracyclines": frozenset({"doxycycline", "minocycline", "tetracycline"}),
    "nsaids": frozenset({"aspirin", "ibuprofen", "naproxen", "diclofenac", "ketorolac", "celecoxib", "meloxicam",
                         "indomethacin", "ketoprofen"}),
    "ace inhibitors": frozenset({"lisinopril", "enalapril", "ramipril", "captopril", "benazepril", "quinapril",
                                 "fosinopril", "perindopril", "trandolapril"}),
    "angiotensin receptor blockers": frozenset({"losartan", "valsartan", "irbesartan", "candesartan", "olmesartan",
                                                "telmisartan"}),
    "statins": frozenset({"atorvastatin", "simvastatin", "rosuvastatin", "pravastatin", "lovastatin"}),
    "opioids": frozenset({"codeine", "morphine", "oxycodone", "hydrocodone", "tramadol", "fentanyl",
                          "hydromorphone", "meperidine"}),
    "beta blockers": frozenset({"metoprolol", "atenolol", "propranolol", "carvedilol", "bisoprolol", "nebivolol"}),
}
"""Drug class → ingredients (RxNorm ingredient names, lower case)."""

CROSS_REACTIVE: dict[str, frozenset[str]] = {
    "penicillins": frozenset({"cephalosporins", "carbapenems"}),
    "cephalosporins": frozenset({"penicillins"}),
}
"""An allergy to a class → classes to flag as possible cross-reactivity."""

CLASS_WORDS: dict[str, str] = {
    "penicillin": "penicillins", "cephalosporin": "cephalosporins", "carbapenem": "carbapenems",
    "sulfa": "sulfonamide antibiotics", "sulfonamide": "sulfonamide antibiotics", "macrolide": "macrolides",
    "quinolone": "fluoroquinolones", "tetracycline": "tetracyclines", "nsaid": "nsaids",
    "ace inhibitor": "ace inhibitors", "statin": "statins", "opioid": "opioids", "opiate": "opioids",
}  # fmt: skip
"""Words in an allergy's name that stand for a whole class ("Allergy to penicillin", "sulfa drugs")."""

CLASS_OF: dict[str, str] = {drug: name for name, drugs in DRUG_CLASSES.items() for drug in drugs}
OTHER_INGREDIENTS = (
    "acetaminophen", "albuterol", "allopurinol", "alendronate", "amitriptyline", "amlodipine", "apixaban",
    "budesonide", "bupropion", "buspirone", "carbamazepine", "cetirizine", "chlorthalidone", "clavulanate",
    "clindamycin", "clonazepam", "clopidogrel", "cyclobenzaprine", "dapagliflozin", "dextromethorphan",
    "digoxin", "diltiazem", "donepezil", "duloxetine", "empagliflozin", "escitalopram", "esomeprazole",
    "estradiol", "ezetimibe", "famotidine", "finasteride", "fluticasone", "folic acid", "fosfomycin",
    "furosemide", "gabapentin", "glipizide", "hydrochlorothiazide", "hydrocortisone", "hydroxyzine", "insulin",
    "lamotrigine", "latanoprost", "levetiracetam", "levothyroxine", "liraglutide", "loratadine", "lorazepam",
    "memantine", "metformin", "methotrexate", "methylphenidate", "methylprednisolone", "metronidazole",
    "montelukast", "nifedipine", "nitrofurantoin", "nitroglycerin", "omeprazole", "ondansetron", "pantoprazole",
    "paroxetine", "pioglitazone", "prednisolone", "prednisone", "pregabalin", "quetiapine", "rivaroxaban",
    "salmeterol", "semaglutide", "sertraline", "sitagliptin", "spironolactone", "sumatriptan", "tamsulosin",
    "tiotropium", "timolol", "topiramate", "trazodone", "triamcinolone", "trimethoprim", "valacyclovir",
    "venlafaxine", "verapamil", "warfarin", "zolpidem",
)  # fmt: skip
"""Common ingredients outside the class table, so that a case's medications are recognised."""
DRUG_ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "hctz": ("hydrochlorothiazide",), "asa": ("aspirin",), "apap": ("acetaminophen",), "tmp-smx": (
        "sulfamethoxazole", "trimethoprim"), "bactrim": ("sulfamethoxazole", "trimethoprim"),
    "keflex": ("cephalexin",), "zithromax": ("azithromycin",), "tylenol": ("acetaminophen",),
}  # fmt: skip
_LINE = re.compile(r"(?im)^(Allergies|Current medications):[ \t]*(.*)$")
_CLAUSE = re.compile(r"[^.,;\n]+")
_NEGATED = re.compile(r"\b(avoid|avoiding|not|no|never|instead of|contraindicated|stop|discontinue)\b")
_NONE = {"", "none", "no known allergies", "nka", "nkda", "unknown"}


@dataclass(frozen=True)
class Flag:
    """One problem with a proposed drug."""

    drug: str
    kind: str  # "allergy", "cross-reactivity", "duplicate" or "same class"
    reason: str

    def __str__(self) -> str:
        return f"{self.drug}: {self.reason}"


@lru_cache(maxsize=1)
def vocabulary() -> DrugVocabulary:
    """Common brands and abbreviations, every ingredient of the class table and other common ones."""
    vocab = DrugVocabulary.with_common_brands()
    for drug in (*CLASS_OF, *OTHER_INGREDIENTS):
        vocab.add(drug, (drug,))
    for short, ingredients in DRUG_ABBREVIATIONS.items():
        vocab.add(short, ingredients)
    return vocab


def case_lists(case_text: str) -> tuple[list[str], list[str]]:
    """The allergies and current medications a case lists ("none" gives an empty list)."""
    found = {"allergies": [], "current medications": []}
    for match in _LINE.finditer(case_text):
        kind, text = match.group(1).lower(), match.group(2)
        items = re.split(r";" if kind == "allergies" else r"[;,]", text)
        found[kind] += [i.strip() for i in items if i.strip().lower() not in _NONE]
    return found["allergies"], found["current medications"]


def proposed_drugs(answer: str) -> list[str]:
    """Ingredients the answer proposes, in order, leaving out clauses that say to avoid or stop them."""
    drugs: dict[str, None] = {}
    for clause in _CLAUSE.findall(answer):
        if not _NEGATED.search(clause.lower()):
            drugs |= dict.fromkeys(sorted(vocabulary().extract(clause)))
    return list(drugs)


def _allergy_targets(allergy: str) -> tuple[set[str], set[str]]:
    """The ingredients and classes one listed allergy rules out."""
    text = allergy.lower()
    drugs = vocabulary().extract(text)
    classes = {CLASS_OF[d] for d in drugs if d in CLASS_OF}
    classes |= {name for word, name in CLASS_WORDS.items() if re.search(rf"\b{word}s?\b", text)}
    return drugs, classes


def check(case_text: str, answer: str) -> list[Flag]:
    """Every conflict between the drugs `answer` proposes and the case's allergies and current medications."""
    allergies, medications = case_lists(case_text)
    current = {d for m in medications for d in vocabulary().extract(m)} | {m.lower() for m in medications}
    ruled_out = [(allergy, *_allergy_targets(allergy)) for allergy in allergies]
    flags = []
    for drug in proposed_drugs(answer):
        drug_class = CLASS_OF.get(drug)
        for allergy, drugs, classes in ruled_out:
            if drug in drugs or drug_class in classes:
                why = "" if drug in drugs else f" ({drug_class})"
                flags.append(Flag(drug, "allergy", f"the patient is allergic to {allergy}{why}"))
            elif drug_class and any(drug_class in CROSS_REACTIVE.get(c, ()) for c in classes):
                flags.append(Flag(drug, "cross-reactivity", f"possible cross-reactivity with the allergy to "
                                                            f"{allergy} ({', '.join(sorted(classes))})"))
        if drug in current:
            flags.append(Flag(drug, "duplicate", "the patient already takes it"))
        elif drug_class and (same := sorted(d for d in current if CLASS_OF.get(d) == drug_class)):
            flags.append(Flag(drug, "same class", f"the patient already takes {', '.join(same)} ({drug_class})"))
    return flags


def warning_text(flags: list[Flag]) -> str:
    """Markdown warning for the doctor (empty when there is nothing to flag)."""
    if not flags:
        return ""
    lines = "\n".join(f"- **{f.drug}** — {f.reason}" for f in flags)
    return f"⚠️ **Check before prescribing:**\n{lines}"
