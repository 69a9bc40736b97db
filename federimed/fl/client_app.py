"""The hospital side (Flower ClientApp): local LoRA training and held-out scoring on this hospital's data.

Only adapter weights enter and leave: the reply carries `ArrayRecord(adapter_state(model))`, a
MetricRecord (train_loss, num-examples, tokens, seconds, bytes) and the hospital's directory name.
The server sends the run's settings (JSON of RunSettings) in the message's ConfigRecord; the data
directory comes from this node only (see `federimed.fl.hospitals`). With node config `outbox=DIR`
the hospital keeps a copy of every adapter it sent (`DIR/round-NNN.safetensors`) for its own audit.
Adapters travel packed into one array each way (`packed_transport`, `federimed.fl.transport`).
Under secure aggregation `secagg_mod` wraps the train handler: it answers the SecAgg+ stages and
sends only the masked update (`federimed.fl.secagg`); the outbox then holds the adapter it was made from.
In a DP run `clip_when_asked` (`federimed.fl.dp`) clips the update to the server's bound before it leaves;
the outbox holds the adapter before clipping. A query message asks for this hospital's cohort counts
(`federimed.fl.cohort_stats`): integer counts per diagnosis stratum, never a record; under SecAgg+ a
training message asks for them as a vector to be masked.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federimed.config import RunSettings
from federimed.fl.cohort_stats import answer_query, answer_vector, is_vector_request
from federimed.fl.dp import clip_when_asked
from federimed.fl.hospitals import OUTBOX_KEY, node_hospital
from federimed.fl.secagg import secagg_mod
from federimed.fl.strategy import HOSPITAL_RECORD
from federimed.fl.transport import packed_transport

if TYPE_CHECKING:  # torch, transformers and peft load on first use: Flower starts a process per message, and
    # the SecAgg+ protocol stages need none of them
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from federimed.training import Example

SETTINGS_KEY = "settings"
"""Key in the message ConfigRecord holding RunSettings as JSON."""
PROXIMAL_MU_KEY = "proximal-mu"
"""Train-config key of FedProx's μ (as Flower's FedProx strategy sends it); absent or 0: plain local training."""

app = ClientApp()


@lru_cache(maxsize=1)
def _model(model_json: str, lora_json: str, seed: int) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model with a LoRA adapter, loaded once per process (the adapter is overwritten per message)."""
    from federimed.model import add_lora, load_base

    settings = RunSettings.model_validate({"model": json.loads(model_json), "lora": json.loads(lora_json)})
    base, tokenizer = load_base(settings.model)
    return add_lora(base, settings.lora, seed=seed), tokenizer


@lru_cache(maxsize=4)
def _examples(path: Path, mtime_ns: int, seq_len: int, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Tokenised dialogues of one file (cached while the file is unchanged)."""
    from federimed.training import encode_dialogues, load_dialogues

    return encode_dialogues(tokenizer, load_dialogues(path), seq_len)


def _setup(msg: Message, context: Context) -> tuple[RunSettings, Path, PeftModel, PreTrainedTokenizerBase]:
    """Settings from the server, this node's hospital, and the model holding the received global adapter."""
    from federimed.model import load_adapter_state

    settings = RunSettings.model_validate_json(str(msg.content["config"][SETTINGS_KEY]))
    hospital = node_hospital(context.node_config)
    model, tokenizer = _model(settings.model.model_dump_json(), settings.lora.model_dump_json(), settings.train.seed)
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    return settings, hospital, model, tokenizer


def _load(path: Path, settings: RunSettings, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    examples = _examples(path, path.stat().st_mtime_ns, settings.train.seq_len, tokenizer)
    if not examples:
        raise ValueError(f"{path}: no dialogue fits seq_len={settings.train.seq_len}")
    return examples


def _reply(msg: Message, hospital: Path, metrics: dict[str, float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), HOSPITAL_RECORD: ConfigRecord({"name": hospital.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[packed_transport, secagg_mod, clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter for this round's steps (`RunSettings.steps_per_round` of this
    hospital's train.jsonl); reply the adapter. Under SecAgg+ cohort statistics, reply the counts vector."""
    if is_vector_request(msg):
        return answer_vector(msg, context)
    from safetensors.torch import save_file

    from federimed.memory import peak_rss_mb
    from federimed.model import adapter_state
    from federimed.training import train_local

    settings, hospital, model, tokenizer = _setup(msg, context)
    config = msg.content["config"]
    server_round, total_rounds = int(config["server-round"]), int(config["total-rounds"])
    examples = _load(hospital / "train.jsonl", settings, tokenizer)
    steps = settings.steps_per_round(len(examples))
    result = train_local(
        model,
        tokenizer,
        examples,
        settings.train,
        steps=steps,
        start_step=(server_round - 1) * steps,
        total_steps=total_rounds * steps,
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
    )
    state = adapter_state(model)
    arrays = ArrayRecord(state)
    num_examples = len(examples)
    if outbox := context.node_config.get(OUTBOX_KEY):
        Path(str(outbox)).mkdir(parents=True, exist_ok=True)
        meta = {"hospital": hospital.name, "round": str(server_round), "num-examples": str(num_examples)}
        save_file(state, Path(str(outbox)) / f"round-{server_round:03d}.safetensors", metadata=meta)
    metrics = {
        "train_loss": result.loss,
        "num-examples": num_examples,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "bytes": arrays.count_bytes(),
        "peak-rss-mb": peak_rss_mb(),
    }
    return _reply(msg, hospital, metrics, arrays)


@app.evaluate(mods=[packed_transport])
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this hospital's held-out sample (mean loss per answer token)."""
    from federimed.training import evaluate_loss

    settings, hospital, model, tokenizer = _setup(msg, context)
    examples = settings.heldout_sample(_load(hospital / "heldout.jsonl", settings, tokenizer))
    loss, tokens = evaluate_loss(
        model, examples, settings.eval_batch_size, settings.train.precision, settings.train.padding
    )
    return _reply(msg, hospital, {"heldout_loss": loss, "num-examples": len(examples), "tokens": tokens})


@app.query()
def cohort(msg: Message, context: Context) -> Message:
    """This hospital's cohort counts over its training decisions (only counts leave)."""
    return answer_query(msg, context)
