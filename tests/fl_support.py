"""Tiny ingested hospital directories (contract format), settings, and an in-process Grid for the Flower tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from federimed.config import RunSettings, TrainSettings

SYSTEM = "You are a clinical decision-support assistant. Suggest what to start for this case."
CASES = [
    ("essential hypertension", "lisinopril 10 MG Oral Tablet"),
    ("type 2 diabetes mellitus", "metformin hydrochloride 500 MG Oral Tablet"),
    ("hyperlipidemia", "simvastatin 20 MG Oral Tablet"),
    ("acute bacterial sinusitis", "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet"),
    ("streptococcal sore throat", "penicillin V potassium 250 MG Oral Tablet"),
    ("chronic obstructive bronchitis", "fluticasone / salmeterol inhaler; albuterol inhaler"),
]


def dialogue(hospital: str, number: int) -> dict:
    """One synthetic case dialogue in the ingest contract's shape."""
    condition, drug = CASES[(number + len(hospital)) % len(CASES)]
    age = 40 + (number * 7) % 45
    return {
        "id": f"{hospital}-case-{number:03d}",
        "patient": f"{hospital}-patient-{number:03d}",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Age {age}. New diagnosis: {condition}. No other problems. What to start?"},
            {"role": "assistant", "content": f"Started: {drug}."},
        ],
    }


def make_hospital(root: Path, name: str, train: int, heldout: int = 2) -> Path:
    """Write `root/name/` with manifest.json, train.jsonl and heldout.jsonl of synthetic dialogues."""
    path = root / name
    path.mkdir(parents=True)
    rows = [dialogue(name, i) for i in range(train + heldout)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:train]))
    (path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[train:]))
    manifest = {
        "hospital": name,
        "sources": [{"path": "synthetic", "format": "test", "version": "0"}],
        "counts": {"train_cases": train, "heldout_cases": heldout},
        "split": {"seed": 0, "heldout_share": 0.2, "train_patients": train, "heldout_patients": heldout},
        "skipped": [],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def tiny_settings(rounds: int = 2, steps: int = 2) -> RunSettings:
    """Settings small enough for CPU tests: 2 steps of 2 dialogues of at most 128 tokens per round."""
    return RunSettings(
        rounds=rounds, train=TrainSettings(local_steps=steps, batch_size=2, seq_len=128), eval_batch_size=4
    )


def leftovers(flwr_home: Path) -> list[str]:
    """Running processes whose environment names this test's FLWR_HOME (every Flower process we started)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in environ and state not in ("Z", "X"):
            found.append(f"{entry.name}: {command[:120]}")
    return found


class LocalGrid:
    """A Grid that delivers each message to `app` in the destination node's own Context (node id → node
    config), and keeps every reply the server received."""

    def __init__(self, node_configs: Mapping[int, dict], app: ClientApp) -> None:
        self.app = app
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
            for node, config in node_configs.items()
        }
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            content = recorddict_from_proto(recorddict_to_proto(message.content))  # a copy, as if sent:
            delivered = Message(content, message.metadata.dst_node_id, message.metadata.message_type)  # not shared
            try:
                reply = self.app(delivered, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - what Flower's runtime turns into an error reply
                reply = Message(Error(code=2, reason=repr(err)), reply_to=message)
            replies.append(reply)
        self.received.extend(replies)
        return replies

