"""Packed adapter transport: bit-exact round trips, and what the wire (the wrapped Grid) actually carries."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from federimed.fl.transport import (
    LAYOUT_RECORD,
    PackedGrid,
    PackingError,
    pack,
    pack_content,
    packed_transport,
    unpack,
    unpack_content,
)


def _adapter(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        "layers.0.q.lora_A": Array(rng.normal(size=(8, 16)).astype(np.float32)),
        "layers.0.q.lora_B": Array(rng.normal(size=(16, 8)).astype(np.float32)),
        "step": Array(np.array([3], dtype=np.int64)),
        "scale": Array(rng.normal(size=(2, 3, 4)).astype(np.float16)),
    })


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        a[k].numpy().dtype == b[k].numpy().dtype and np.array_equal(a[k].numpy(), b[k].numpy()) for k in a
    )


def test_pack_round_trip_is_bit_exact_across_dtypes_and_shapes():
    record = _adapter()
    packed, layout = pack(record)
    assert list(packed.keys()) == ["packed"] and packed["packed"].numpy().dtype == np.uint8
    assert packed.count_bytes() < record.count_bytes() + 64
    assert _same(unpack(packed, layout), record)


def test_unpack_rejects_a_record_that_does_not_match_its_layout():
    packed, layout = pack(_adapter())
    short = ArrayRecord({"packed": Array(packed["packed"].numpy()[:-4].copy())})
    with pytest.raises(PackingError, match="too short for array 'scale'"):
        unpack(short, layout)
    long = ArrayRecord({"packed": Array(np.concatenate([packed["packed"].numpy(), np.zeros(4, np.uint8)]))})
    with pytest.raises(PackingError, match="4 bytes beyond its layout"):
        unpack(long, layout)


def test_pack_content_packs_only_multi_array_records_and_restores_the_rest_untouched():
    content = RecordDict({
        "arrays": _adapter(),
        "single": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
        "config": ConfigRecord({"server-round": 2}),
        "metrics": MetricRecord({"loss": 1.5}),
    })
    packed = pack_content(content)
    assert list(packed["arrays"].keys()) == ["packed"]
    assert list(packed["single"].keys()) == ["w"]
    assert set(packed.config_records[LAYOUT_RECORD].keys()) == {"arrays"}
    restored = unpack_content(packed)
    assert LAYOUT_RECORD not in restored.config_records
    assert _same(restored["arrays"], content["arrays"]) and _same(restored["single"], content["single"])
    assert restored["config"]["server-round"] == 2 and restored["metrics"]["loss"] == 1.5
    assert unpack_content(content) is content  # nothing packed: nothing to do




class WireGrid:
    """Stands in for Flower's Grid: records the arrays it was asked to send, answers through the ClientApp mod."""

    def __init__(self, handler):
        self.handler, self.sent_arrays = handler, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent_arrays.append(list(message.content["arrays"].keys()))
            replies.append(packed_transport(message, Context(0, 1, {}, RecordDict(), {}), self.handler))
        return replies


def test_packed_grid_and_mod_carry_one_array_each_way_and_hand_the_keyed_adapter_to_both_ends(task_identity):
    seen_by_hospital = []

    def train(msg: Message, context: Context) -> Message:
        seen_by_hospital.append(msg.content["arrays"])
        update = ArrayRecord({k: Array(v.numpy() + 1) for k, v in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    wire = WireGrid(train)
    grid = PackedGrid(wire)
    sent = _adapter(1)
    instruction = Message(RecordDict({"arrays": sent}), dst_node_id=1, message_type=MessageType.TRAIN)
    [reply] = grid.send_and_receive([instruction])
    assert wire.sent_arrays == [["packed"]]  # one array on the wire
    assert _same(seen_by_hospital[0], sent)
    expected = ArrayRecord({k: Array(v.numpy() + 1) for k, v in sent.items()})
    assert _same(reply.content["arrays"], expected)
    assert reply.content["metrics"]["num-examples"] == 4


def test_a_reply_that_cannot_be_unpacked_stays_packed_and_the_update_screen_rejects_it(task_identity):
    from federimed.fl.validation import ReplyRejected, ReplyScreen

    def broken(msg: Message, context: Context) -> Message:
        packed, layout = pack(msg.content["arrays"])
        truncated = ArrayRecord({"packed": Array(packed["packed"].numpy()[:-8].copy())})
        content = RecordDict({"arrays": truncated, LAYOUT_RECORD: ConfigRecord({"arrays": layout}),
                              "metrics": MetricRecord({"num-examples": 4})})
        return Message(content, reply_to=msg)

    class RawWire(WireGrid):  # the hospital's reply goes out as it made it, bypassing the mod's packing
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for message in messages:
                message.content = unpack_content(message.content)
                replies.append(self.handler(message, Context(0, 1, {}, RecordDict(), {})))
            return replies

    sent = _adapter(2)
    [reply] = PackedGrid(RawWire(broken)).send_and_receive(
        [Message(RecordDict({"arrays": sent}), dst_node_id=1, message_type=MessageType.TRAIN)]
    )
    assert list(reply.content["arrays"].keys()) == ["packed"]
    screen = ReplyScreen()
    screen.set_global(sent)
    with pytest.raises(ReplyRejected, match="adapter keys differ"):
        screen.check(reply.content)
