"""Record layouts (Alpaca, ShareGPT, OpenAI messages) -> Conversation.

Each reader checks the fields it needs and raises DataError naming the record and field, so
the caller only has to add the file name.
"""
from __future__ import annotations

from roletune.data.conversation import Conversation, Message, structure_problem
from roletune.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"cannot tell the format from fields {sorted(record)[:6]}; "
                    "expected instruction/output (alpaca), conversations (sharegpt) or messages; "
                    "or set data.format")


def to_conversation(record, fmt: str, system_prompt: str | None) -> Conversation:
    """One record -> a validated conversation. `system_prompt` applies when the record has none."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_kind(record)}")
    reader = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}[fmt]
    messages = reader(record)
    if messages[0].role != "system":
        system = _optional_text(record, "system") if fmt != "alpaca" else None
        system = system or system_prompt
        if system:
            messages.insert(0, Message("system", system))
    problem = structure_problem(messages)
    if problem:
        raise DataError(problem)
    return messages


def _alpaca(record: dict) -> Conversation:
    instruction = _text(record, "instruction", allow_empty=True)
    extra = _optional_text(record, "input") or ""
    prompt = "\n".join(part for part in (instruction, extra) if part)
    if not prompt.strip():
        raise DataError("field instruction: empty prompt (instruction and input are both empty)")
    reply = _text(record, "output")
    messages = []
    system = _optional_text(record, "system")
    if system:
        messages.append(Message("system", system))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"field history: expected a list of [prompt, reply] pairs, got {_kind(history)}")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"field history[{index}]: expected a [prompt, reply] pair of strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages + [Message("user", prompt), Message("assistant", reply)]


def _sharegpt(record: dict) -> Conversation:
    turns = _turn_list(record, "conversations")
    messages = []
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        speaker, value = _turn_fields(turn, where, "from", "value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"field {where}.from: unknown speaker {speaker!r}; "
                            f"expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append(Message(SHAREGPT_ROLES[speaker], value))
    return messages


def _messages(record: dict) -> Conversation:
    turns = _turn_list(record, "messages")
    messages = []
    for index, turn in enumerate(turns):
        where = f"messages[{index}]"
        role, content = _turn_fields(turn, where, "role", "content")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"field {where}.role: unknown role {role!r}; expected system, user or assistant")
        messages.append(Message(role, content))
    return messages


def _turn_list(record: dict, name: str) -> list:
    turns = record.get(name)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field {name}: expected a non-empty list of turns, got {_kind(turns)}")
    return turns


def _turn_fields(turn, where: str, role_key: str, text_key: str) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"field {where}: expected an object with {role_key} and {text_key}, got {_kind(turn)}")
    for key in (role_key, text_key):
        if not isinstance(turn.get(key), str):
            raise DataError(f"field {where}.{key}: expected a string, got {_kind(turn.get(key))}")
    return turn[role_key], turn[text_key]


def _text(record: dict, name: str, allow_empty: bool = False) -> str:
    if name not in record:
        raise DataError(f"field {name}: missing")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"field {name}: expected a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"field {name}: empty {'reply' if name == 'output' else 'text'}")
    return value


def _optional_text(record: dict, name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"field {name}: expected a string, got {_kind(value)}")
    return value


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__
