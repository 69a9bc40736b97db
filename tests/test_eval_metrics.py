"""Drug-name normalisation, per-case metrics and the bootstrap, on hand-made cases."""

from __future__ import annotations

import json

import pytest

from federimed.evaluation.drugs import DrugVocabulary
from federimed.evaluation.metrics import Interval, bootstrap_ci, recall, rouge_l, set_scores


@pytest.fixture
def vocab(tmp_path) -> DrugVocabulary:
    targets = tmp_path / "targets.train.jsonl"
    drugs = [
        {"code": "562251", "display": "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"},
        {"code": "860975", "display": "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"},
        {"code": "209387", "display": "Acetaminophen 325 MG Oral Tablet [Tylenol]"},
        {"code": "314076", "display": "lisinopril 10 MG Oral Tablet", "ingredients": ["lisinopril"]},
        {"code": "834102", "display": "Penicillin V Potassium 500 MG Oral Tablet", "ingredients": ["penicillin v"]},
        {"code": "1", "display": "sodium chloride 9 MG/ML Injectable Solution", "ingredients": ["sodium chloride"]},
    ]
    targets.write_text(json.dumps({"id": "c1", "drugs": drugs}) + "\n")
    return DrugVocabulary.from_targets([targets])


def test_brands_doses_and_combinations_map_to_ingredients(vocab: DrugVocabulary) -> None:
    assert vocab.extract("Start Tylenol 325 mg as needed.") == {"acetaminophen"}
    assert vocab.extract("Start amoxicillin/clavulanate 875/125 MG twice daily") == {"amoxicillin", "clavulanate"}
    assert vocab.extract("Augmentin for 10 days") == {"amoxicillin", "clavulanate"}
    assert vocab.extract("Metformin 500 mg XR, then LISINOPRIL 10mg") == {"metformin", "lisinopril"}
    assert vocab.extract("Glucophage") == {"metformin"}
    assert vocab.extract("Penicillin 500 mg") == vocab.extract("penicillin V potassium") == {"penicillin v"}
    assert vocab.extract("low sodium diet") == set()  # a generic first word is no drug alias


def test_extract_needs_word_boundaries(vocab: DrugVocabulary) -> None:
    assert vocab.extract("No medication; lifestyle advice only.") == set()
    assert vocab.extract("lisinoprilx") == set()


def test_set_scores_on_hand_made_cases() -> None:
    s = set_scores({"lisinopril", "amlodipine"}, {"lisinopril"})
    assert (s.precision, s.recall) == (0.5, 1.0)
    assert s.f1 == pytest.approx(2 / 3)
    assert set_scores(set(), set()).f1 == 1.0
    assert set_scores(set(), {"metformin"}).f1 == 0.0
    assert set_scores({"metformin"}, set()).f1 == 0.0
    assert recall({"a"}, {"a", "b"}) == 0.5
    assert recall({"a"}, set()) is None


def test_rouge_l_orders_similarity() -> None:
    ref = "Start medications: lisinopril. Care plan: lifestyle education."
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert rouge_l("Start medications: lisinopril.", ref) > rouge_l("Take a rest.", ref)


def test_bootstrap_ci_covers_mean_and_shrinks_with_n() -> None:
    small = bootstrap_ci([0.0, 1.0] * 10, seed=1)
    large = bootstrap_ci([0.0, 1.0] * 500, seed=1)
    assert small.mean == pytest.approx(0.5) and large.mean == pytest.approx(0.5)
    assert small.low < 0.5 < small.high
    assert (large.high - large.low) < (small.high - small.low)
    assert bootstrap_ci([0.3, 0.3, 0.3]).low == pytest.approx(0.3)
    assert bootstrap_ci([0.4]) == Interval(0.4, None, None, 1)
    assert bootstrap_ci([]) == Interval(None, None, None, 0)
    assert bootstrap_ci([0.1, 0.9], seed=3) == bootstrap_ci([0.1, 0.9], seed=3)
