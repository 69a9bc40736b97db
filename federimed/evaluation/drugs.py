"""Drug-name normalisation: free text (brands, doses, combinations) → RxNorm-style ingredient names.

The vocabulary is built from the data itself (each medication's RxNorm description and the
ingredients `ingest.cases.parse_ingredients` found in it), plus a short table of common US brand names so that
an answer saying "Augmentin" or "Glucophage" scores like one saying the ingredients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.cases import parse_ingredients

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

# First words of multi-word ingredients that name no single drug ("sodium chloride", "insulin lispro").
_GENERIC_FIRST_WORDS = {"sodium", "potassium", "calcium", "magnesium", "ferrous", "zinc", "insulin", "vitamin"}
_BRACKET = re.compile(r"\[([^\]]+)\]")


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
        ingredients = list(ingredients) if ingredients else parse_ingredients(description)
        for ingredient in ingredients:
            self.add(ingredient, (ingredient,))
            first = ingredient.split()[0]
            if first != ingredient and first not in _GENERIC_FIRST_WORDS:
                self.add(first, (ingredient,))  # "penicillin v", "epoetin alfa": answers often name the first word
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
