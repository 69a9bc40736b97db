"""Drug-name normalisation: free text (brands, doses, combinations) → RxNorm-style ingredient names.

The vocabulary is built from the data itself (each medication's RxNorm description and the
ingredients the case builder parsed from it), plus a short table of common US brand names so that
an answer saying "Augmentin" or "Glucophage" scores like one saying the ingredients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Common brands → ingredients, for brands Synthea's descriptions do not carry in brackets.
COMMON_BRANDS: dict[str, tuple[str, ...]] = {
    "augmentin": ("amoxicillin", "clavulanate"),
    "glucophage": ("metformin",),
    "zestril": ("lisinopril",),
    "prinivil": ("lisinopril",),
    "norvasc": ("amlodipine",),
    "microzide": ("hydrochlorothiazide",),
    "cozaar": ("losartan",),
    "zocor": ("simvastatin",),
    "lipitor": ("atorvastatin",),
    "plavix": ("clopidogrel",),
    "lopressor": ("metoprolol",),
    "toprol": ("metoprolol",),
    "lasix": ("furosemide",),
    "advair": ("fluticasone", "salmeterol"),
    "victoza": ("liraglutide",),
    "invokana": ("canagliflozin",),
    "nitrostat": ("nitroglycerin",),
    "proventil": ("albuterol",),
    "advil": ("ibuprofen",),
    "motrin": ("ibuprofen",),
    "aleve": ("naproxen",),
    "coumadin": ("warfarin",),
    "eliquis": ("apixaban",),
    "xarelto": ("rivaroxaban",),
    "zoloft": ("sertraline",),
    "prozac": ("fluoxetine",),
    "celexa": ("citalopram",),
    "lexapro": ("escitalopram",),
    "wellbutrin": ("bupropion",),
    "synthroid": ("levothyroxine",),
}

# Words that are never part of an ingredient name: salts, forms, routes, release modifiers.
_NON_INGREDIENT = {
    "hydrochloride", "hcl", "sodium", "potassium", "calcium", "magnesium", "succinate", "tartrate",
    "bitartrate", "citrate", "maleate", "besylate", "mesylate", "sulfate", "acetate", "propionate",
    "hydrobromide", "phosphate", "fumarate", "bromide", "oral", "tablet", "capsule", "solution",
    "suspension", "injection", "injectable", "inhaler", "inhalation", "metered", "dose", "dry",
    "powder", "extended", "release", "delayed", "chewable", "topical", "cream", "ointment", "spray",
    "mucosal", "nasal", "ophthalmic", "transdermal", "system", "prefilled", "syringe", "auto",
    "injector", "drug", "implant", "pack", "day", "actuat", "mg", "ml", "unt", "hr", "mcg",
    "abuse", "deterrent", "gel", "patch", "film", "coated", "kit", "vial", "intrauterine",
}

_BRACKET = re.compile(r"\[([^\]]+)\]")
_WORD = re.compile(r"[a-z][a-z\-]+")


def ingredients_of(description: str) -> list[str]:
    """Ingredient names of one RxNorm description ("Amoxicillin 250 MG / Clavulanate 125 MG ..." →
    ["amoxicillin", "clavulanate"]). Falls back to the product name for brand-only packs."""
    text = _BRACKET.sub(" ", description.lower())
    found: list[str] = []
    for part in text.split(" / "):
        words = [w for w in _WORD.findall(part) if w not in _NON_INGREDIENT and not w.startswith("nda")]
        if words and words[0] not in found:
            found.append(words[0])
    return found


@dataclass
class DrugVocabulary:
    """Maps surface names (ingredients, brands) to canonical ingredient names."""

    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def add(self, surface: str, ingredients: Iterable[str]) -> None:
        surface = surface.strip().lower()
        ingredients = tuple(i.lower() for i in ingredients if i)
        if len(surface) >= 3 and ingredients:
            self.names.setdefault(surface, ingredients)
            self._pattern = None

    def add_description(self, description: str, ingredients: Iterable[str] | None = None) -> None:
        """Learn one RxNorm description: its ingredients and any bracketed brand name."""
        ingredients = list(ingredients) if ingredients else ingredients_of(description)
        for ingredient in ingredients:
            self.add(ingredient, (ingredient,))
        for brand in _BRACKET.findall(description):
            self.add(brand, ingredients)

    @classmethod
    def with_common_brands(cls) -> DrugVocabulary:
        vocab = cls()
        for brand, ingredients in COMMON_BRANDS.items():
            for ingredient in ingredients:
                vocab.add(ingredient, (ingredient,))
            vocab.add(brand, ingredients)
        return vocab

    @classmethod
    def from_targets(cls, paths: Iterable[Path]) -> DrugVocabulary:
        """Build from `targets.*.jsonl` files (each drug has a description and its ingredients)."""
        vocab = cls.with_common_brands()
        for path in paths:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    for drug in json.loads(line).get("drugs", []):
                        vocab.add_description(drug["display"], drug.get("ingredients"))
        return vocab

    def extract(self, text: str) -> set[str]:
        """Canonical ingredients named anywhere in free text (word-boundary match, longest first)."""
        if self._pattern is None:
            alternatives = sorted(self.names, key=len, reverse=True)
            self._pattern = re.compile(r"\b(" + "|".join(map(re.escape, alternatives)) + r")\b")
        found: set[str] = set()
        for match in self._pattern.finditer(text.lower()):
            found.update(self.names[match.group(1)])
        return found
