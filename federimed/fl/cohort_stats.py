"""Federated cohort statistics on Flower: each hospital counts, the server sums, suppresses and writes.

Plain: one query message per hospital; each answers its counts (`CohortCounts.to_metrics`, integers only)
and the server adds them up. With `secagg`, the server never sees one hospital's counts: a first query asks
only for the names of the counts each hospital holds (which strata and drugs occur there, no number); the
server sends the sorted union back in a training message, and each hospital answers the vector of its
counts in that order through SecAgg+ (`federimed.fl.secagg`, every hospital weighing 1, integer counts
quantised without loss), so that only the sum is unmasked. With `cohort_epsilon`, hospitals bound what each
patient contributes and the server noises the sum before release (`federimed.cohort_privacy`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from federimed.fl.hospitals import node_hospital
from federimed.fl.settings import ServerOptions
from federimed.fl.strategy import HOSPITAL_RECORD

log = logging.getLogger("flwr").getChild("federimed")

COUNTS_RECORD, NAMES_RECORD, DIAGNOSES_RECORD = "cohort-counts", "cohort-names", "cohort-diagnoses"
"""Records of a hospital's reply: its counts, or only their names; the diagnosis codes' display names."""
QUERY_RECORD = "cohort-query"
"""The server's ConfigRecord: "names-only" (the first SecAgg+ step) and "bounds" (JSON, a DP release)."""
VECTOR_KEYS = "cohort-keys"
"""Train-config key of the SecAgg+ step: JSON list of the count names, in the order of the vector."""
VECTOR = "counts"
SECURE_COUNT_RANGE = 2**20
"""The largest count one hospital may send through SecAgg+; with 2 × this many quantisation levels each
count is an exact level, and sums of up to 2^32 / 2^21 = 2048 hospitals fit Flower's modulus."""


def _counts(context: Context, query: ConfigRecord) -> tuple[Path, dict[str, int], dict[str, str]]:
    """This node's hospital and its counts (bounded per patient when the query carries bounds)."""
    from federimed.cohort import CohortCounts
    from federimed.cohort_privacy import ContributionBounds

    hospital = node_hospital(context.node_config)
    bounds = ContributionBounds(**json.loads(str(query["bounds"]))) if query.get("bounds") else None
    counts = CohortCounts.of_hospital(hospital, bounds)
    return hospital, counts.to_metrics(), counts.diagnoses


def answer_query(msg: Message, context: Context) -> Message:
    """A hospital's answer to a cohort query: its counts, or (names-only) just which counts it holds."""
    query = msg.content.config_records.get(QUERY_RECORD, ConfigRecord())
    hospital, flat, diagnoses = _counts(context, query)
    content = RecordDict({DIAGNOSES_RECORD: ConfigRecord(diagnoses), HOSPITAL_RECORD: ConfigRecord({"name": hospital.name})})
    if query.get("names-only"):
        content[NAMES_RECORD] = ConfigRecord({"names": json.dumps(sorted(flat))})
    else:
        content[COUNTS_RECORD] = MetricRecord(flat)
    return Message(content=content, reply_to=msg)


def is_vector_request(msg: Message) -> bool:
    """Whether a training message asks for the counts vector (the SecAgg+ step), not for LoRA training."""
    return "config" in msg.content.config_records and VECTOR_KEYS in msg.content["config"]


def answer_vector(msg: Message, context: Context) -> Message:
    """A hospital's counts as a vector in the server's order (what `secagg_mod` masks and sends)."""
    config = msg.content["config"]
    hospital, flat, _ = _counts(context, config)
    names = json.loads(str(config[VECTOR_KEYS]))
    if missing := len(set(flat) - set(names)):
        raise ValueError(f"the server's list of counts lacks {missing} of this hospital's: not sent")
    vector = np.array([flat.get(name, 0) for name in names], dtype=np.float64)
    if vector.size and vector.max() > SECURE_COUNT_RANGE:
        raise ValueError(f"a count exceeds {SECURE_COUNT_RANGE}, the most SecAgg+ carries exactly: not sent")
    content = RecordDict({
        "arrays": ArrayRecord({VECTOR: Array(vector)}),
        "metrics": MetricRecord({"num-examples": 1}),
        HOSPITAL_RECORD: ConfigRecord({"name": hospital.name}),
    })  # fmt: skip
    return Message(content=content, reply_to=msg)


def gather(grid: Grid, options: ServerOptions) -> Path:
    """Ask every hospital for its cohort counts, sum them (through SecAgg+ with `secagg`), add DP noise with
    `cohort_epsilon`, suppress small cells and write the artefact; returns its path. Logs say how many
    hospitals answered, never a count."""
    from federimed.cohort import CohortCounts, release, write_artefact
    from federimed.cohort_privacy import ContributionBounds, CountNoise

    deadline = time.monotonic() + options.round_timeout
    while len(nodes := list(grid.get_node_ids())) < options.hospitals:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {options.hospitals} hospitals joined for cohort statistics")
        time.sleep(1)
    noise = None
    query = ConfigRecord({"names-only": options.secagg})
    if options.cohort_epsilon:
        bounds = ContributionBounds()
        noise = CountNoise.calibrate(options.cohort_epsilon, options.cohort_delta, options.min_cell, bounds)
        query["bounds"] = json.dumps(asdict(bounds))
    replies = _answers(grid.send_and_receive(_queries(nodes, query), timeout=options.round_timeout))
    diagnoses = {code: name for reply in replies for code, name in reply.content[DIAGNOSES_RECORD].items()}
    if options.secagg:
        flat, names = _secure_sum(grid, replies, query, options)
        counts = CohortCounts.from_metrics(flat, diagnoses)
    else:
        counts, names = CohortCounts(diagnoses=diagnoses), [_name(reply) for reply in replies]
        for reply in replies:
            counts.add(CohortCounts.from_metrics(reply.content[COUNTS_RECORD], {}))
    if noise is not None:
        counts = noise.applied(counts, len(names), np.random.default_rng())
    artefact = release(counts, options.min_cell, names, noise)
    path = write_artefact(options.runs_dir, artefact)
    privacy = f", DP ε {noise.epsilon:g} at δ {noise.delta:g} per patient" if noise else ""
    log.info("cohort statistics of %d hospitals (%s)%s%s, cells under %d suppressed → %s", len(names),
             ", ".join(sorted(names)), " summed by SecAgg+" if options.secagg else "", privacy,
             artefact["min_cell"], path)
    return path


def _queries(nodes: list[int], query: ConfigRecord) -> list[Message]:
    return [Message(RecordDict({QUERY_RECORD: query}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes]


def _answers(replies) -> list[Message]:
    """The replies without error (each error is logged); at least one."""
    answered = []
    for reply in replies:
        if reply.has_error():
            log.warning("a hospital could not count its cohort: %s", reply.error.reason)
        else:
            answered.append(reply)
    if not answered:
        raise RuntimeError("no hospital answered the cohort-statistics query")
    return answered


def _name(reply: Message) -> str:
    return str(reply.content[HOSPITAL_RECORD]["name"])


def _secure_sum(grid: Grid, named: list[Message], query: ConfigRecord, options: ServerOptions
                ) -> tuple[dict[str, int], list[str]]:
    """The sum of the hospitals' count vectors over the union of their count names, unmasked by SecAgg+."""
    from federimed.fl.secagg import SecAggGrid
    from federimed.fl.transport import PackedGrid

    keys = sorted({key for reply in named for key in json.loads(str(reply.content[NAMES_RECORD]["names"]))})
    secure = SecAggGrid(
        PackedGrid(grid), num_shares=options.secagg_num_shares,
        reconstruction_threshold=options.secagg_reconstruction_threshold, max_weight=1.0,
        clipping_range=float(SECURE_COUNT_RANGE), quantization_range=2 * SECURE_COUNT_RANGE, equal_weights=True,
        timeout=options.round_timeout,
    )  # fmt: skip
    config = ConfigRecord({"server-round": 1, VECTOR_KEYS: json.dumps(keys), "bounds": query.get("bounds", "")})
    messages = [
        Message(RecordDict({"arrays": ArrayRecord({VECTOR: Array(np.zeros(len(keys)))}), "config": config}),
                dst_node_id=reply.metadata.src_node_id, message_type=MessageType.TRAIN)
        for reply in named
    ]  # fmt: skip
    summed = _answers(secure.send_and_receive(messages, timeout=options.round_timeout))
    mean = summed[0].content["arrays"][VECTOR].numpy()  # every reply carries the same unmasked mean
    total = np.rint(mean * len(summed)).astype(np.int64)
    return {key: int(n) for key, n in zip(keys, total, strict=True) if n}, [_name(reply) for reply in summed]
