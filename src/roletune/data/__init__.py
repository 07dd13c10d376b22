"""Training data: read records in any supported layout and turn them into conversations."""
from __future__ import annotations

import random

from roletune.data.conversation import Conversation, Message
from roletune.data.readers import detect_format, to_conversation
from roletune.data.sources import read_records
from roletune.errors import DataError


def load_conversations(data_cfg) -> list[Conversation]:
    """Read `data.path` and convert every record; the first bad record stops with its location."""
    name, records = read_records(data_cfg.path, data_cfg.split)
    if not records:
        raise DataError(f"{name}: no records")
    fmt = data_cfg.format
    if fmt == "auto":
        try:
            fmt = detect_format(records[0]) if isinstance(records[0], dict) else "alpaca"
        except DataError as exc:
            raise DataError(f"{name}: record 0: {exc}") from None
    conversations = []
    for index, record in enumerate(records):
        try:
            conversations.append(to_conversation(record, fmt, data_cfg.system_prompt))
        except DataError as exc:
            raise DataError(f"{name}: record {index}: {exc}") from None
    return conversations


def split_heldout(conversations: list[Conversation], eval_size: float, seed: int, name: str = "data"):
    """(train, held out): `eval_size` rows (a count, or a fraction if < 1) drawn with `seed`."""
    if not eval_size:
        return conversations, []
    count = max(1, round(eval_size * len(conversations))) if eval_size < 1 else int(eval_size)
    if count >= len(conversations):
        raise DataError(f"{name}: data.eval_size={eval_size:g} holds out {count} of {len(conversations)} rows, "
                        "leaving none to train on")
    order = random.Random(seed).sample(range(len(conversations)), len(conversations))
    held = set(order[:count])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [conversations[i] for i in sorted(held)])


__all__ = ["Conversation", "Message", "load_conversations", "split_heldout"]
