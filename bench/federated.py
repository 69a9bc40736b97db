"""Federated training costs: client overhead, bytes on the wire per hospital, wall time per round.

    .venv/bin/python bench/federated.py [--data data/hospitals] [--rounds 1] [--local-steps 5] [--batch-size 4]
        [--seq-len 256] [--throughput-steps 4] [--repeats 2]

1. Throughput: `train_local` standalone vs the same steps through the Flower ClientApp handler (adapter
   in from an ArrayRecord, training, adapter out into the reply), alternated `--repeats` times on the
   first hospital; tokens/s of each and their ratio (target >= 0.9).
2. One federation on loopback (`federimed train`'s path: SuperLink + a SuperNode per hospital), --local-steps per round:
   bytes sent to and received from each hospital per round vs the adapter's own size (target <= 1.05)
   and vs the full model, and wall time per round.
Hospitals: the ingested ones under --data; when there are fewer than two, the shared Synthea samples
(ma-2025 CSV, ne-2023 CSV, ma-2025 FHIR) are ingested into a temporary directory first.
Writes bench/results/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `ingest` package, not bench/ingest.py next to this script
SHARED = Path(os.environ.get("FEDERIMED_SHARED_DATA", REPO.parent / "shared" / "data" / "synthea"))
from federimed.commands.demo import PROFILES  # after the path fix above

DEMO = PROFILES["default"]
SAMPLES = {"ma-2025-csv": "ma-2025/csv", "ne-2023-csv": "ne-2023/csv", "ma-2025-fhir": "ma-2025/fhir"}


def hospitals(data: Path, scratch: Path) -> list[Path]:
    """The ingested hospitals to use: those under `data`, else the shared samples ingested into `scratch`."""
    from federimed.fl.hospitals import HospitalDataError, ingested_hospitals
    from ingest.pipeline import ingest

    try:
        found = ingested_hospitals(data)
        if len(found) >= 2:
            return found
    except HospitalDataError:
        pass
    for name, source in SAMPLES.items():
        ingest([SHARED / source], name, scratch)
    return ingested_hospitals(scratch)


def throughput(settings, hospital: Path, repeats: int) -> dict:
    """Tokens/s of train_local alone and inside the ClientApp's train handler, alternated."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federimed.fl import client_app
    from federimed.fl.client_app import SETTINGS_KEY
    from federimed.fl.server_app import initial_adapter
    from federimed.model import add_lora, load_base
    from federimed.training import encode_dialogues, load_dialogues, train_local

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # set by Flower's runtime otherwise
    start = initial_adapter(settings)
    base, tokenizer = load_base(settings.model)
    model = add_lora(base, settings.lora, seed=settings.train.seed)
    examples = encode_dialogues(tokenizer, load_dialogues(hospital / "train.jsonl"), settings.train.seq_len)
    steps = settings.steps_per_round(len(examples))
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(hospital)}, state=RecordDict(), run_config={})
    config = ConfigRecord({SETTINGS_KEY: settings.model_dump_json(), "server-round": 1, "total-rounds": 1})

    def in_client() -> tuple[int, float]:
        content = RecordDict({"arrays": ArrayRecord(start), "config": config})
        message = Message(content, dst_node_id=1, message_type="train")
        began = time.perf_counter()
        reply = client_app.app(message, context)
        return int(reply.content["metrics"]["tokens"]), time.perf_counter() - began

    def standalone() -> tuple[int, float]:
        from federimed.model import load_adapter_state

        load_adapter_state(model, start)
        result = train_local(model, tokenizer, examples, settings.train, steps=steps, start_step=0, total_steps=steps)
        return result.tokens, result.seconds

    began = time.perf_counter()
    in_client()  # warm-up: the ClientApp loads its model once per process, as in a federation
    first_call = time.perf_counter() - began
    alone, client = [], []
    for _ in range(repeats):
        tokens, seconds = standalone()
        alone.append(tokens / seconds)
        tokens, seconds = in_client()
        client.append(tokens / seconds)
    return {
        "hospital": hospital.name,
        "steps": steps,
        "standalone_tokens_per_s": statistics.median(alone),
        "in_client_tokens_per_s": statistics.median(client),
        "ratio": statistics.median(client) / statistics.median(alone),
        "samples": {"standalone": alone, "in_client": client},
        "first_client_call_s": first_call,
    }


def federation(settings, found: list[Path], runs: Path) -> dict:
    """One federation on loopback (as `federimed train`): per-round bytes per hospital and wall time."""
    from safetensors.torch import load_file

    from federimed.fl.deployment import federate_on_loopback
    from federimed.fl.settings import ServerOptions
    from federimed.model import load_base

    rounds: list[dict] = []
    options = ServerOptions(settings=settings, hospitals=len(found), runs_dir=runs)
    began = time.perf_counter()
    run_dir = federate_on_loopback(found, options, REPO, rounds.append)
    total = time.perf_counter() - began
    adapter = load_file(run_dir / "round-1" / "adapter_model.safetensors")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    base, _ = load_base(settings.model)
    model_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    per_hospital = {
        name: {
            "bytes_received": row["bytes_received"],
            "bytes_sent": row["bytes_sent"],
            "received_vs_adapter": row["bytes_received"] / adapter_bytes,
            "sent_vs_adapter": row["bytes_sent"] / adapter_bytes,
            "received_vs_full_model_percent": 100 * row["bytes_received"] / model_bytes,
        }
        for name, row in rounds[0]["hospitals"].items()
    }
    return {
        "how": "SuperLink + one SuperNode per hospital on loopback, `flwr run` (federimed train's path)",
        "hospitals": [h.name for h in found],
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": model_bytes,
        "round_1_bytes": per_hospital,
        "max_bytes_vs_adapter": max(max(r["received_vs_adapter"], r["sent_vs_adapter"]) for r in per_hospital.values()),
        "round_wall_s": [entry["seconds"] for entry in rounds],
        "total_wall_s_including_startup": total,
        "train_loss": [entry["train_loss"] for entry in rounds],
        "heldout_loss": [entry["heldout_loss"] for entry in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "hospitals")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=5, help="steps per hospital per round")
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size, help="demo default")
    parser.add_argument("--seq-len", type=int, default=DEMO.seq_len, help="demo default")
    parser.add_argument("--throughput-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "federated.json")
    args = parser.parse_args()

    import torch

    from federimed.config import RunSettings, TrainSettings

    train = TrainSettings(local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len)
    demo = RunSettings(rounds=args.rounds, train=train)
    with tempfile.TemporaryDirectory(prefix="federimed-bench-") as scratch:
        found = hospitals(args.data, Path(scratch) / "data")
        quick = demo.model_copy(update={"train": demo.train.model_copy(update={"local_steps": args.throughput_steps,
                                                                                "epochs": 0})})
        speed = throughput(quick, found[0], args.repeats)
        print(f"throughput: standalone {speed['standalone_tokens_per_s']:.0f} tok/s, "
              f"in client {speed['in_client_tokens_per_s']:.0f} tok/s, ratio {speed['ratio']:.3f}")
        fed = federation(demo, found, Path(scratch) / "runs")
        print(f"bytes vs adapter <= {fed['max_bytes_vs_adapter']:.4f}; round wall s {fed['round_wall_s']}")
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "settings": demo.model_dump(mode="json"),
        "throughput": speed,
        "federation": fed,
        "targets": {"ratio_min": 0.9, "bytes_vs_adapter_max": 1.05},
        "met": {"ratio": speed["ratio"] >= 0.9, "bytes": fed["max_bytes_vs_adapter"] <= 1.05},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
