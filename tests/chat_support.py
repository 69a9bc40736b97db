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


CRASH, BUSY = 666, 777
"""Prompt ids at which `CrashingEngine` kills its own process with SIGSEGV (as a native crash would), or
stays busy in native-like work for 10 minutes."""


class CrashingEngine:
    """An engine that answers "a", "b", "c", segfaults on a prompt holding `CRASH` and hangs on `BUSY`: the
    guard is under test, not a model."""

    name = "crashing"
    tokenizer = None
    context_length = 64

    def stream(self, prompt_ids, *, max_new_tokens, temperature):
        import os
        import signal

        import time

        if CRASH in prompt_ids:
            os.kill(os.getpid(), signal.SIGSEGV)
        if BUSY in prompt_ids:
            time.sleep(600)
        yield from ["a", "b", "c"][:max_new_tokens]

    def greedy(self, prompts, *, max_new_tokens, batch_size=8, on_batch=None):
        return [[1] * max_new_tokens for _ in prompts]
