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


CRASH, BUSY, SLOW = 666, 777, 555
"""Prompt ids at which `CrashingEngine` kills its own process with SIGSEGV (as a native crash would), stays
busy in native-like work for 10 minutes, or takes 0.2 s per piece."""


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
        for piece in ["a", "b", "c"][:max_new_tokens]:
            time.sleep(0.2 if SLOW in prompt_ids else 0)
            yield piece

    def stream_together(self, prompts, *, max_new_tokens, stopped):
        from federimed.serving.backend import stream_one_by_one

        return stream_one_by_one(self, prompts, max_new_tokens, stopped)

    def greedy(self, prompts, *, max_new_tokens, batch_size=8, on_batch=None):
        return [[1] * max_new_tokens for _ in prompts]


PROPOSED = "amoxicillin"
"""The drug `teach_one_answer` makes an adapter propose for every case."""
CARE_PLAN = (
    "Care plan: Infectious disease care plan (Recommendation to rest; Increase fluid intake; Complete the full "
    "antibiotic course; Review at a follow-up visit in seven days; Return at once if fever, rash, swelling of the "
    "face or difficulty breathing appear; Check allergies and current medications before any change)."
)
"""A long answer tail, so that a doctor's answer lasts a few seconds (the queue test needs one to wait on)."""


def teach_one_answer(peft: object, tokenizer: object, cases: int = 8, steps: int = 24) -> None:
    """Train `peft` (a LoRA model) until it answers every case "Start medications: amoxicillin." and a long
    care plan, with and without guideline excerpts in the prompt, so that a browser test sees an answer the
    safety check must flag for a penicillin-allergic patient. A real (tiny) run of the product's training loop."""
    import json

    from federimed.assistant import build_prompt
    from federimed.config import TrainSettings
    from federimed.free_text import understand
    from federimed.retrieval import Snippet
    from federimed.training import encode_dialogues, train_local

    answer = f"Start medications: {PROPOSED}.\nProcedures: none.\n{CARE_PLAN}"
    lines = (Path(__file__).parent / "data" / "doctor_cases.jsonl").read_text().splitlines()[:cases]
    excerpt = [Snippet(text="First-line treatment as the guideline says.", title="Guideline", section="Treatment",
                       source="guideline.md", url="", licence="", score=1.0)]
    dialogues = [
        {"messages": build_prompt(understand(json.loads(line)["text"]).text, snippets) + [{"role": "assistant", "content": answer}]}
        for line in lines for snippets in ([], excerpt)
    ]  # fmt: skip
    settings = TrainSettings(batch_size=4, lr=2e-3, seq_len=384)
    train_local(peft, tokenizer, encode_dialogues(tokenizer, dialogues, settings.seq_len), settings, steps=steps)
