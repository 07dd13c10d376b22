"""Training data: read records in any supported layout and turn them into conversations."""
from __future__ import annotations

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


__all__ = ["Conversation", "Message", "load_conversations"]
