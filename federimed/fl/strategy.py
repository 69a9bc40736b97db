"""FedAvg over LoRA adapters that waits for every hospital once, survives drop-outs and keeps a ledger.

Every training reply is screened first (`federimed.fl.validation`: shape, NaN/Inf, update-norm bound);
rejected replies are left out of the round and recorded with their reason. The aggregation rule is
FedAvg by default, or Flower's trimmed mean / median (`aggregator`).

Round 1 starts only when all expected hospitals are connected; afterwards every round samples all hospitals
connected at that moment (a late joiner takes part from the next round on) and needs only `min_hospitals`
of them, so a hospital that drops out does not stop the federation: its error reply (or its silence until
the round timeout) is logged as "hospital X dropped in round N" and recorded in the round's ledger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM

from federimed.fl.fednova import FedNova
from federimed.fl.validation import ReplyScreen, make_aggregator

log = logging.getLogger("flwr").getChild("federimed")  # shown and streamed with Flower's own logs

HOSPITAL_RECORD = "hospital"
"""Key of the ConfigRecord in a client's reply that names the hospital (`{"name": ...}`)."""
TRAIN_METRICS = ("train_loss", "num-examples", "steps", "tokens", "seconds", "bytes", "peak-rss-mb")
"""The MetricRecord keys of a training reply (exactly these; anything else is rejected)."""


@dataclass
class HospitalRound:
    """What one hospital did in one round."""

    hospital: str
    node_id: int
    bytes_sent: int
    """Adapter bytes the server sent to this hospital."""
    bytes_received: int = 0
    """Adapter bytes this hospital sent back."""
    train_loss: float | None = None
    num_examples: int = 0
    steps: int = 0
    """Optimizer steps this hospital ran in the round."""
    tokens: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    """Peak resident memory of the hospital's training process so far (MiB)."""
    heldout_loss: float | None = None
    heldout_tokens: int = 0
    """Answer tokens the held-out loss is averaged over."""
    update_norm: float | None = None
    """‖reply − global adapter‖₂ of this hospital's training reply."""


@dataclass
class RoundLog:
    """One federated round: per-hospital rows, drop-outs and the aggregated losses."""

    round: int
    hospitals: dict[str, HospitalRound] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    """Hospital → why it dropped out of this round's training."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Hospital → why its training reply was screened out (not aggregated)."""
    eval_errors: dict[str, str] = field(default_factory=dict)
    """Hospital → why it could not score the new global adapter."""
    train_loss: float | None = None
    heldout_loss: float | None = None
    secure_aggregation: bool = False
    """Whether SecAgg+ summed the updates (the server saw no single hospital's update)."""
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def to_json(self) -> dict:
        """A JSON-ready dict (for metrics.json and the checkpoint)."""
        data = asdict(self)
        data.pop("started")
        return data


def _array_bytes(message: Message) -> int:
    """Bytes of the arrays (the adapter) a message carries."""
    return sum(record.count_bytes() for record in message.content.array_records.values())


def hospital_name(reply: Message) -> str | None:
    """The hospital a reply names in its `hospital` ConfigRecord, if any."""
    if reply.has_error() or HOSPITAL_RECORD not in reply.content.config_records:
        return None
    return str(reply.content.config_records[HOSPITAL_RECORD]["name"])


class AdapterFedAvg(FedAvg):
    """FedAvg (weighted by `num-examples`) with hospital-aware sampling, drop-out handling and a round ledger.

    `first_round` shifts round numbers so a resumed run continues its numbering (strategy.start counts
    from 1): `server-round` in the train config and all ledger entries use the run's round numbers.
    Replies whose update norm exceeds `max_update_norm` (0: no bound) or that are malformed are rejected;
    `aggregator` is "fedavg", "fednova" (step-normalised, `server_lr` times τ_eff steps), "fedavgm" (server SGD with `server_lr` and `server_momentum`), "trimmed-mean"
    (trimming `trim_fraction` at each end) or "median".
    `secure`: the replies come from a `federimed.fl.secagg.SecAggGrid` and all carry the SecAgg+ aggregate,
    so no per-hospital update norm exists (the hospitals check their own bound) and none is recorded.
    """

    def __init__(
        self,
        *,
        hospitals: int,
        min_hospitals: int = 1,
        fraction_evaluate: float = 1.0,
        first_round: int = 1,
        max_update_norm: float = 0.0,
        aggregator: str = "fedavg",
        trim_fraction: float = 0.34,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        secure: bool = False,
    ) -> None:
        if not 1 <= min_hospitals <= hospitals:
            raise ValueError(f"min_hospitals must be between 1 and hospitals ({hospitals}), got {min_hospitals}")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_hospitals,
            min_evaluate_nodes=min_hospitals,
            min_available_nodes=hospitals,
        )
        self.offset = first_round - 1
        self.secure = secure
        self.rounds: dict[int, RoundLog] = {}
        self.names: dict[int, str] = {}
        self._sampled: dict[int, int] = {}  # node id -> bytes sent, for the round in flight
        self.screen = ReplyScreen(max_update_norm=max_update_norm, metric_keys=TRAIN_METRICS)
        self.aggregator = make_aggregator(
            aggregator, trim_fraction=trim_fraction, server_lr=server_lr, server_momentum=server_momentum
        )
        self._sent: list[Message] = []  # the instructions in flight (the Grid sets their message ids)

    def run_round(self, server_round: int) -> int:
        """The run's round number for strategy.start's `server_round`."""
        return server_round + self.offset

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")

    def _reply_name(self, reply: Message) -> str:
        return hospital_name(reply) or self._name(self._node(reply))

    def _node(self, reply: Message) -> int:
        """The node a reply answers for: error replies made by the SuperLink for a lost node carry the
        SuperLink's id as sender, so match the instruction they reply to (ids are set when sent)."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter to every connected hospital (all of them, the first time)."""
        number = self.run_round(server_round)
        messages = list(super().configure_train(number, arrays, config, grid))
        self.min_available_nodes = self.min_train_nodes  # only round 1 waits for every hospital
        self.rounds[number] = RoundLog(round=number, secure_aggregation=self.secure)
        self._sampled = {m.metadata.dst_node_id: _array_bytes(m) for m in messages}
        self.screen.set_global(arrays)
        if isinstance(self.aggregator, FedNova) or isinstance(self.aggregator, FedAvgM) and (
            self.aggregator.current_arrays is None
        ):
            self.aggregator.current_arrays = arrays  # both step from the global adapter (FedAvgM keeps its own)
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, record each hospital's reply, rejection or drop-out, then aggregate the rest."""
        number = self.run_round(server_round)
        replies = list(replies)
        entry = self.rounds[number]
        answered = {self._node(reply) for reply in replies}
        screened = self.screen.screen(replies, self._reply_name, number)
        entry.rejected = screened.rejected
        for reply in screened.accepted:
            node = self._node(reply)
            if reply.has_error():
                self._drop(entry, node, f"error {reply.error.code}: {reply.error.reason}")
                continue
            name = hospital_name(reply) or self._name(node)
            self.names[node] = name
            metrics = reply.content["metrics"]
            entry.hospitals[name] = HospitalRound(
                hospital=name,
                node_id=node,
                bytes_sent=self._sampled.get(node, 0),
                bytes_received=int(metrics["bytes"]) if self.secure else _array_bytes(reply),  # masked upload
                train_loss=float(metrics["train_loss"]),
                num_examples=int(metrics["num-examples"]),
                steps=int(metrics["steps"]),
                tokens=int(metrics["tokens"]),
                seconds=float(metrics["seconds"]),
                peak_rss_mb=float(metrics["peak-rss-mb"]),
                update_norm=None if self.secure else screened.norms[name],
            )
        for node in self._sampled.keys() - answered:
            self._drop(entry, node, "no reply before the round timeout")
        arrays, metrics = self.aggregator.aggregate_train(number, screened.accepted)
        if arrays is None:
            log.warning("round %d: no usable reply; the global adapter stays as it was", number)
        if metrics is not None:
            entry.train_loss = float(metrics["train_loss"])
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the connected hospitals for the held-out loss of the new global adapter."""
        self._sent = list(super().configure_evaluate(self.run_round(server_round), arrays, config, grid))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each hospital's held-out loss and their mean per answer token over all hospitals."""
        number = self.run_round(server_round)
        replies = list(replies)
        entry = self.rounds[number]
        for reply in replies:
            node = self._node(reply)
            if reply.has_error():
                name = self._name(node)
                entry.eval_errors[name] = f"error {reply.error.code}: {reply.error.reason}"
                log.warning("hospital %s could not evaluate in round %d (%s)", name, number, entry.eval_errors[name])
                continue
            name = hospital_name(reply) or self._name(node)
            self.names[node] = name
            metrics = reply.content["metrics"]
            row = entry.hospitals.setdefault(name, HospitalRound(hospital=name, node_id=node, bytes_sent=0))
            row.heldout_loss = float(metrics["heldout_loss"])
            row.heldout_tokens = int(metrics["tokens"])
        scored = [h for h in entry.hospitals.values() if h.heldout_loss is not None and h.heldout_tokens]
        if scored:  # per answer token over all hospitals, as the baselines report it
            tokens = sum(h.heldout_tokens for h in scored)
            entry.heldout_loss = sum(h.heldout_loss * h.heldout_tokens for h in scored) / tokens
        metrics = super().aggregate_evaluate(number, replies)
        entry.seconds = time.time() - entry.started
        return metrics

    def _drop(self, entry: RoundLog, node: int, reason: str) -> None:
        name = self._name(node)
        entry.dropped.setdefault(name, reason)
        log.warning("hospital %s dropped in round %d (%s)", name, entry.round, reason)
