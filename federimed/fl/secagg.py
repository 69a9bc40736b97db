"""Secure aggregation (Flower's SecAgg+) for the Message-API federation: the server only sees the sum.

Flower 1.42 ships SecAgg+ only for its legacy workflow API (`SecAggPlusWorkflow` on the server, which
drives a legacy Strategy through a `LegacyContext`, and `secaggplus_mod` on the client, which speaks
FitIns/FitRes). Two adapters let the Message-API ServerApp and ClientApp use them unchanged:

- Server: `SecAggGrid` wraps the ServerApp's Grid. Evaluation and every other message pass straight
  through; a batch of training instructions (what `strategy.start` sends each round) instead runs the
  four SecAgg+ stages (setup, share keys, collect masked vectors, unmask) with those instructions as
  the FitIns. Each hospital uploads only its masked, quantised update; the server unmasks nothing but
  the num-examples-weighted sum. It answers `strategy.start` with one reply per hospital that carries
  that hospital's metrics and the securely aggregated adapter (global + weighted mean update), the
  way Flower's own legacy workflow hands every FitRes the aggregate: FedAvg of identical arrays is that
  aggregate, so the strategy, its ledger, DP wrappers and the checkpoint work as before.
- Client: `secagg_mod` (on the ClientApp's train handler) lets `secaggplus_mod` answer the protocol
  stages and, in the collect stage, hands the unchanged train handler a Message-API message (arrays
  named by the key list the server sends along, config), then returns the update (reply − global) as a
  FitRes for masking. The hospital refuses to send an update with NaN/Inf values or an L2 norm above
  `max-update-norm` (its error makes it drop out of the round): the server cannot screen masked updates.

SecAgg+ quantises each value of (num-examples / max_weight) × update, clipped to ±clipping_range, into
quantization_range levels (stochastic rounding), so the aggregate differs from plain FedAvg by at most
`aggregation_tolerance` per value.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from federimed.fl.grid_wrapper import GridWrapper
from federimed.fl.strategy import HOSPITAL_RECORD

if TYPE_CHECKING:
    from federimed.fl.settings import ServerOptions

log = logging.getLogger("flwr").getChild("federimed")

KEYS = "secagg-keys"
"""FitIns config key: JSON list of the adapter's array names, in the order of the legacy Parameters."""
NORM_BOUND = "max-update-norm"
"""FitIns config key: the L2 bound a hospital checks its own update against (0: none)."""
EQUAL_WEIGHTS = "secagg-equal-weights"
"""FitIns config key: every hospital weighs 1 in the sum (a DP run's noise assumes an equal-weight mean)."""
HOSPITAL = "hospital"
"""FitRes metric: the hospital's name (legacy metrics may hold strings)."""
CLIPPED = "secagg-clipped"
"""FitRes metric: how many of the hospital's update values the SecAgg+ clipping range cut off."""
MODULUS = 2**32
"""Flower's default SecAgg+ modulus: masks and sums live in [0, 2^32)."""


def aggregation_tolerance(
    num_examples: Sequence[int], *, clipping_range: float, quantization_range: int, max_weight: float
) -> float:
    """Largest per-value difference between the SecAgg+ aggregate and exact FedAvg of unclipped updates.

    Each hospital's weighted update is rounded (stochastically) to one of `quantization_range` levels
    over [-clipping_range, clipping_range], an error below one level (2·clipping_range/quantization_range);
    the server divides the sum by Σ weights = Σ num_examples / max_weight.
    """
    level = 2 * clipping_range / quantization_range
    return len(num_examples) * level * max_weight / sum(num_examples)


class _SecureRound(LegacyStrategy):
    """The legacy-strategy face SecAggPlusWorkflow needs for one round.

    `configure_fit` turns the Message-API training instructions into FitIns (array names travel in the
    config, since legacy Parameters are unnamed); `aggregate_fit` keeps what the protocol hands over:
    each participating hospital's FitRes (its metrics) and the unmasked weighted mean of the updates.
    """

    def __init__(
        self, grid: Grid, instructions: Sequence[Message], max_update_norm: float, equal_weights: bool
    ) -> None:
        self.instructions = {m.metadata.dst_node_id: m for m in instructions}
        self.proxies = {node: GridClientProxy(node, grid, grid.run.run_id) for node in self.instructions}
        self.max_update_norm = max_update_norm
        self.equal_weights = equal_weights
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[BaseException | tuple[ClientProxy, FitRes]] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One FitIns per instruction: the global adapter (unnamed, in key order) and the train config."""
        fit = []
        for node_id, message in self.instructions.items():
            arrays = message.content["arrays"]
            config = dict(message.content["config"]) | {
                KEYS: json.dumps(list(arrays.keys())), NORM_BOUND: self.max_update_norm,
                EQUAL_WEIGHTS: self.equal_weights,
            }
            parameters = compat.arrayrecord_to_parameters(arrays, keep_input=True)
            fit.append((self.proxies[node_id], FitIns(parameters, config)))
        return fit

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        """Keep the hospitals' FitRes; every one carries the same unmasked aggregate."""
        self.results, self.failures = results, failures
        return (results[0][1].parameters if results else None), {}

    # SecAggPlusWorkflow only trains; the rest of the legacy interface has nothing to do.
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class SecAggGrid(GridWrapper):
    """A Grid whose training rounds run through SecAgg+; everything else goes to the wrapped Grid.

    `num_shares` (share of the round's hospitals each secret is split among) and
    `reconstruction_threshold` (share of those shares needed to rebuild a secret, at least 2) are
    fractions as in `SecAggPlusWorkflow`; `max_weight`, `clipping_range` and `quantization_range` set
    the quantisation (see `aggregation_tolerance`); `timeout` bounds each protocol stage. Hospitals weigh
    by num-examples, or all the same with `equal_weights` (then a weight is 1, so use max_weight=1).
    """

    def __init__(
        self,
        grid: Grid,
        *,
        num_shares: float = 1.0,
        reconstruction_threshold: float = 0.67,
        max_weight: float = 1000.0,
        clipping_range: float = 1.0,
        quantization_range: int = 2**22,
        max_update_norm: float = 0.0,
        equal_weights: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__(grid)
        self.max_update_norm = max_update_norm
        self.equal_weights = equal_weights
        self.workflow = SecAggPlusWorkflow(
            num_shares=float(num_shares), reconstruction_threshold=float(reconstruction_threshold),
            max_weight=max_weight, clipping_range=clipping_range, quantization_range=quantization_range,
            modulus_range=MODULUS, timeout=timeout,
        )

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Training instructions: one SecAgg+ round; anything else: the wrapped Grid's send_and_receive."""
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages)

    def _secure_round(self, instructions: list[Message]) -> list[Message]:
        server_round = int(instructions[0].content["config"]["server-round"])
        round_ = _SecureRound(self.grid, instructions, self.max_update_norm, self.equal_weights)
        nodes = SimpleClientManager()
        for proxy in round_.proxies.values():
            nodes.register(proxy)
        context = LegacyContext(
            Context(run_id=self.grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=round_,
            client_manager=nodes,
        )
        global_arrays = instructions[0].content["arrays"]
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = global_arrays
        self.workflow(self.grid, context)
        return _replies(round_, global_arrays, server_round)


def secure_grid(grid: Grid, options: ServerOptions) -> SecAggGrid:
    """`grid` with training rounds through SecAgg+ as `options` (secagg-*, max-update-norm) configure it.

    With `dp` every hospital weighs 1 (the DP noise is calibrated to an equal-weight mean) and the clipping
    range is `dp_clip`: no value of an update clipped to L2 norm `dp_clip` can exceed it, so SecAgg+ never
    cuts one; the server's DP wrapper then noises the securely summed mean.
    """
    max_weight, clipping = (1.0, options.dp_clip) if options.dp else (
        options.secagg_max_weight, options.secagg_clipping_range)
    log.info(
        "secure aggregation (SecAgg+) on: shares %.2f, threshold %.2f, max weight %g, clipping ±%g, %d levels%s",
        options.secagg_num_shares, options.secagg_reconstruction_threshold, max_weight, clipping,
        options.secagg_quantization_range, ", equal weights (DP)" if options.dp else "",
    )
    return SecAggGrid(
        grid,
        num_shares=options.secagg_num_shares,
        reconstruction_threshold=options.secagg_reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=clipping,
        quantization_range=options.secagg_quantization_range,
        max_update_norm=options.max_update_norm,
        equal_weights=options.dp,
        timeout=options.round_timeout,
    )


def _replies(round_: _SecureRound, global_arrays: ArrayRecord, server_round: int) -> list[Message]:
    """One reply per instruction: the hospital's metrics with the aggregate, or an error if it dropped out."""
    replies = []
    if round_.results:
        mean_update = parameters_to_ndarrays(round_.results[0][1].parameters)
        aggregate = ArrayRecord({
            key: Array((array.numpy().astype(np.float64) + update).astype(array.numpy().dtype))
            for (key, array), update in zip(global_arrays.items(), mean_update, strict=True)
        })
    for proxy, fitres in round_.results:
        metrics = dict(fitres.metrics)
        name = str(metrics.pop(HOSPITAL))
        if clipped := int(metrics.pop(CLIPPED, 0)):
            log.warning(
                "round %d: hospital %s had %d update value(s) clipped to the SecAgg+ clipping range; "
                "raise secagg-clipping-range or secagg-max-weight", server_round, name, clipped,
            )
        content = RecordDict({
            "arrays": aggregate, "metrics": MetricRecord(metrics), HOSPITAL_RECORD: ConfigRecord({"name": name}),
        })
        replies.append(Message(content, reply_to=round_.instructions[proxy.node_id]))
    summed = {proxy.node_id for proxy, _ in round_.results}
    why = "its masked update is not in the SecAgg+ sum"
    if not round_.results:
        why = "the SecAgg+ round ended without a sum (fewer hospitals than it needs)"
    if round_.failures:
        why += f"; errors in this round: {'; '.join(sorted({str(f) for f in round_.failures}))}"
    for node_id, instruction in round_.instructions.items():
        if node_id not in summed:
            replies.append(Message(Error(code=ErrorCode.UNKNOWN, reason=why), reply_to=instruction))
    return replies


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: answer SecAgg+ training messages (from a SecAggGrid) with `secaggplus_mod`; pass others on."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    reply = secaggplus_mod(msg, context, partial(_train_update, call_next))
    masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
    if masked is not None:  # collect stage: report what really leaves the hospital
        reply.content.config_records["fitres.metrics"]["bytes"] = sum(len(b) for b in masked)
    return reply


def _train_update(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """Run the Message-API train handler on a SecAgg+ FitIns; return its update (reply − global) as FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(KEYS)))
    bound = float(config.pop(NORM_BOUND, 0.0))
    equal = bool(config.pop(EQUAL_WEIGHTS, False))
    sent = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(sent):
        raise ValueError(f"SecAgg+ instruction names {len(keys)} arrays but carries {len(sent)}")
    msg.content = RecordDict({
        "arrays": ArrayRecord({key: Array(value) for key, value in zip(keys, sent, strict=True)}),
        "config": ConfigRecord(config),
    })
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"local training failed: {reply.error.reason}")
    trained = reply.content["arrays"]
    if list(trained.keys()) != keys:
        raise ValueError("the trained adapter's arrays differ from those the server sent")
    update = [trained[key].numpy() - value for key, value in zip(keys, sent, strict=True)]
    if not all(np.isfinite(u).all() for u in update):
        raise ValueError("the local update holds NaN/Inf values; it is not sent")
    norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update))
    if bound and norm > bound:
        raise ValueError(f"the local update norm {norm:.4g} exceeds the bound {bound:.4g}; it is not sent")
    metrics = dict(reply.content["metrics"])
    examples = 1 if equal else int(metrics["num-examples"])
    state = context.state.config_records[RECORD_KEY_STATE]
    weight = examples / float(state["max_weight"])
    limit = float(state["clipping_range"])
    clipped = sum(int((np.abs(u) * weight > limit).sum()) for u in update)
    if clipped:
        log.warning("%d update value(s) exceed the SecAgg+ clipping range ±%g and are clipped", clipped, limit)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(update),
        num_examples=examples,
        metrics=metrics | {HOSPITAL: str(reply.content[HOSPITAL_RECORD]["name"]), CLIPPED: clipped},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
