"""Training data: read records in any supported layout and turn them into conversations."""
from __future__ import annotations

import logging
import random
from collections import Counter

from roletune.data.conversation import RECORDED_NAMES, Conversation, Message
from roletune.data.readers import EmptyPrompt, detect_format, to_conversation
from roletune.data.sources import read_records
from roletune.errors import DataError


log = logging.getLogger(__name__)


def load_conversations(data_cfg, left_out: list[int] | None = None,
                       names: Counter | None = None) -> list[Conversation]:
    """Read `data.path` and convert every record; the first bad record stops with its location. A record
    with an empty prompt (the character speaks first: one such record in a whole book's worth of pairs is
    common) is left out with a warning, its index added to `left_out`, unless data.strict refuses the file.
    `names` counts the character names the records give (RECORDED_NAMES)."""
    names = Counter() if names is None else names
    name, records = read_records(data_cfg.path, data_cfg.split)
    if not records:
        raise DataError(f"{name}: no records")
    fmt = data_cfg.format
    if fmt == "auto":
        try:
            fmt = detect_format(records[0]) if isinstance(records[0], dict) else "alpaca"
        except DataError as exc:
            raise DataError(f"{name}: record 0: {exc}") from None
    conversations, empty = [], []
    for index, record in enumerate(records):
        try:
            if data_cfg.format == "auto" and isinstance(record, dict):
                detect_format(record)  # a record of no known layout: say which layouts there are
            conversations.append(to_conversation(record, fmt, data_cfg.system_prompt))
            names.update(recorded_names(record))
        except EmptyPrompt as exc:
            if data_cfg.strict:
                raise DataError(f"{name}: record {index}: {exc} (data.strict)") from None
            empty.append(index)
        except DataError as exc:
            raise DataError(f"{name}: record {index}: {exc}") from None
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        log.warning("%s: left out %d record(s) with an empty prompt (instruction and input both empty): record %s; "
                    "set data.strict=true to refuse the file instead", name, len(empty), shown)
        if left_out is not None:
            left_out.extend(empty)
    if not conversations:
        raise DataError(f"{name}: no record has a prompt")
    return conversations


def recorded_names(record) -> list[str]:
    """The character's name and aliases a record gives, if any."""
    if not isinstance(record, dict):
        return []
    name, aliases = (record.get(key) for key in RECORDED_NAMES)
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise DataError(f"field {RECORDED_NAMES[0]}: expected the character's name, got {name!r}")
    if aliases is not None and not (isinstance(aliases, list) and all(isinstance(a, str) and a.strip()
                                                                       for a in aliases)):
        raise DataError(f"field {RECORDED_NAMES[1]}: expected a list of names, got {aliases!r}")
    return [n.strip() for n in [name or "", *(aliases or [])] if n.strip()]


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


__all__ = ["Conversation", "Message", "detect_format", "load_conversations", "read_records", "split_heldout"]
