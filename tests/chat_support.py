"""Helpers shared by the chat tests: a small guideline index built from a few shipped documents."""

from __future__ import annotations

import shutil
from pathlib import Path

from ingest.guidelines import shipped_corpus_dir

TINY_CORPUS = ("hypertension.md", "pharyngitis.md", "copd.md", "type-2-diabetes.md")


def build_tiny_index(folder: Path) -> Path:
    """Index four shipped guideline summaries into `folder/index` (signed with this installation's key)."""
    from federimed.retrieval import build_index

    docs = folder / "guidelines"
    docs.mkdir(parents=True, exist_ok=True)
    for name in TINY_CORPUS:
        shutil.copy(shipped_corpus_dir() / name, docs / name)
    return build_index(docs, folder / "index").index_dir
