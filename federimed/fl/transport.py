"""Adapters travel as one packed array: a bit-exact transport encoding, invisible to everything else.

Flower 1.42 sends each array of an ArrayRecord as its own object, every object one authenticated HTTP
request through the SuperNode and the SuperLink. A LoRA adapter on every linear layer of a small model has
hundreds of arrays; on loopback those requests, not the training, dominated a round's wall time. On the way
out each multi-array ArrayRecord becomes one uint8 array holding the arrays' raw bytes, with its layout
(keys, dtypes, shapes) in a ConfigRecord; on the way in it is restored bit for bit. `PackedGrid` does this
for the ServerApp, `packed_transport` (a ClientApp mod) for the hospitals, so strategies, update screening,
DP, SecAgg+ and checkpoints only ever see the keyed adapter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from federimed.fl.grid_wrapper import GridWrapper

LAYOUT_RECORD = "packed-layout"
"""ConfigRecord naming each packed ArrayRecord and the layout of its arrays (JSON)."""
PACKED_KEY = "packed"

log = logging.getLogger("flwr").getChild("federimed")


class PackingError(ValueError):
    """A packed record does not match its layout."""


def pack(record: ArrayRecord) -> tuple[ArrayRecord, str]:
    """One uint8 array with the raw bytes of every array of `record`, and the layout (JSON) to restore it."""
    arrays = {key: array.numpy() for key, array in record.items()}
    layout = [[key, a.dtype.str, list(a.shape)] for key, a in arrays.items()]
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays.values()])
    return ArrayRecord({PACKED_KEY: Array(flat)}), json.dumps(layout)


def unpack(record: ArrayRecord, layout: str) -> ArrayRecord:
    """The keyed ArrayRecord that `pack` made `record` from."""
    if list(record.keys()) != [PACKED_KEY]:
        raise PackingError(f"a packed record holds one array {PACKED_KEY!r}, not {sorted(record.keys())}")
    flat = record[PACKED_KEY].numpy()
    arrays, offset = {}, 0
    for key, dtype, shape in json.loads(layout):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + size > flat.size:
            raise PackingError(f"packed record too short for array {key!r}: {flat.size} bytes")
        arrays[key] = flat[offset : offset + size].view(np.dtype(dtype)).reshape(shape)
        offset += size
    if offset != flat.size:
        raise PackingError(f"packed record has {flat.size - offset} bytes beyond its layout")
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with every ArrayRecord of more than one array packed (the layouts in LAYOUT_RECORD)."""
    layouts = {}
    packed = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            packed[name], layouts[name] = pack(record)
        else:
            packed[name] = record
    if layouts:
        packed[LAYOUT_RECORD] = ConfigRecord(layouts)
    return packed


def unpack_content(content: RecordDict) -> RecordDict:
    """`content` as it was before `pack_content` (unchanged when nothing was packed)."""
    if LAYOUT_RECORD not in content.config_records:
        return content
    layouts = content.config_records[LAYOUT_RECORD]
    restored = RecordDict()
    for name, record in content.items():
        if name == LAYOUT_RECORD:
            continue
        restored[name] = unpack(record, str(layouts[name])) if name in layouts else record
    return restored


def packed_transport(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: unpack the instruction's adapter, pack the reply's."""
    if msg.has_content():
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


class PackedGrid(GridWrapper):
    """A Grid that packs the ArrayRecords of the messages it sends and unpacks those of the replies."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages([_packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self.grid.send_and_receive([_packed(m) for m in messages], timeout=timeout)
        return [_unpacked(m) for m in replies]


def _packed(message: Message) -> Message:
    if message.has_content():
        message.content = pack_content(message.content)
    return message


def _unpacked(message: Message) -> Message:
    """The reply with its adapter restored; one that cannot be restored stays packed, so the strategy's
    update screening rejects it (its keys differ from the adapter's) and the round goes on without it."""
    if message.has_content():
        try:
            message.content = unpack_content(message.content)
        except (ValueError, TypeError, KeyError) as err:  # PackingError is a ValueError
            log.warning("reply from node %s cannot be unpacked, left packed for rejection: %s",
                        message.metadata.src_node_id, err)
    return message
