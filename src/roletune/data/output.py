"""Writing a character dataset cut from a screenplay or a novel: the records, written whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from roletune.data.conversation import RECORDED_NAMES, Conversation
from roletune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages")
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def render(conversations: list[Conversation], fmt: str, lines: bool, names: list[str]) -> str:
    """Alpaca records ({instruction, input, output}), ShareGPT records ({conversations: [{from, value}]}) or
    messages records ({messages: [{role, content}]}), each with the character's names (RECORDED_NAMES); as
    JSON Lines (one record a line) or as one JSON list."""
    recorded = {RECORDED_NAMES[0]: names[0], **({RECORDED_NAMES[1]: names[1:]} if names[1:] else {})}
    if fmt == "alpaca":
        records = [{"instruction": c[-2].content, "input": "", "output": c[-1].content, **recorded}
                   for c in conversations]
    elif fmt == "sharegpt":
        records = [{"conversations": [{"from": SHAREGPT_NAMES[m.role], "value": m.content} for m in c], **recorded}
                   for c in conversations]
    else:
        records = [{"messages": [m.as_dict() for m in c], **recorded} for c in conversations]
    if lines:
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return json.dumps(records, ensure_ascii=False, indent=2) + "\n"


def write_aside(target: Path, body: str) -> None:
    # Write a temporary file beside the target, then rename it: a failure at any point leaves no
    # half-written --out behind (and no temporary file either).
    written = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False) as tmp:
            written = Path(tmp.name)
            tmp.write(body)
        os.replace(written, target)
    except BaseException as exc:
        if written is not None:
            written.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise DataError(f"{target}: cannot write ({exc.strerror or exc}); nothing was written") from None
        raise
