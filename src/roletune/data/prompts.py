"""Prompt files for compare and generate: plain text (one prompt a line) or JSONL records."""
from __future__ import annotations

import json
from pathlib import Path

from roletune.data.conversation import ROLES
from roletune.errors import DataError


def read_prompts(path: str) -> list[dict]:
    """Records that each hold `prompt` (a string) or `messages` (a list of role/content turns).

    A .txt file gives one prompt per non-empty line; a .jsonl file gives one record per line,
    either a JSON string or an object with `prompt` or `messages` (other fields are kept).
    """
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            records.append({"prompt": line.strip()})
            continue
        try:
            records.append(_prompt_record(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
        except DataError as exc:
            raise DataError(f"{path}: line {number}: {exc}") from None
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def prompt_messages(record: dict) -> list[dict]:
    return record["messages"] if "messages" in record else [{"role": "user", "content": record["prompt"]}]


def _prompt_record(value) -> dict:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise DataError(f"expected a string or an object with prompt or messages, got {type(value).__name__}")
    if isinstance(value.get("prompt"), str) and value["prompt"].strip():
        return value
    messages = value.get("messages")
    if not (isinstance(messages, list) and messages):
        raise DataError("expected a non-empty string field prompt or a list field messages")
    for index, turn in enumerate(messages):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            raise DataError(f"field messages[{index}]: expected {{role: system|user|assistant, content: string}}")
    if messages[-1]["role"] != "user":
        raise DataError("field messages: the last turn must be the user's, to be answered")
    return value
