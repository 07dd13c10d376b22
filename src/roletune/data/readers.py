"""Record layouts (Alpaca, ShareGPT, OpenAI messages) -> Conversation.

Each reader checks the fields it needs and raises DataError naming the record and field, so
the caller only has to add the file name.
"""
from __future__ import annotations

from roletune.data.conversation import Conversation, Message, structure_problem
from roletune.errors import DataError

class EmptyPrompt(DataError):
    """An Alpaca record whose instruction and input are both empty: the character speaks first."""


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
    problem = structure_problem(messages) or _unicode_problem(messages)
    if problem:
        raise DataError(problem)
    return messages


def _unicode_problem(messages: Conversation) -> str | None:
    """JSON can spell a lone surrogate (\\ud800), which is not text: no tokenizer can encode it."""
    for index, message in enumerate(messages):
        try:
            message.content.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"message {index} ({message.role}): not valid Unicode at character {exc.start} "
                    f"({message.content[exc.start]!r}, a lone surrogate)")
    return None


def _alpaca(record: dict) -> Conversation:
    instruction = _text(record, "instruction", allow_empty=True)
    extra = _optional_text(record, "input") or ""
    prompt = "\n".join(part for part in (instruction, extra) if part)
    reply = _text(record, "output")  # checked first: a record without a reply is refused even when strict is off
    if not prompt.strip():
        raise EmptyPrompt("field instruction: empty prompt (instruction and input are both empty)")
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
    return _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)


def _messages(record: dict) -> Conversation:
    return _turns(record, "messages", "role", "content", {role: role for role in ("system", "user", "assistant")})


def _turns(record: dict, name: str, role_key: str, text_key: str, roles: dict) -> Conversation:
    """A list of turn objects -> messages; `roles` maps the file's role names to ours."""
    messages = []
    for index, turn in enumerate(_turn_list(record, name)):
        where = f"{name}[{index}]"
        role, text = _turn_fields(turn, where, role_key, text_key)
        if role not in roles:
            raise DataError(f"field {where}.{role_key}: unknown role {role!r}; expected one of {', '.join(roles)}")
        messages.append(Message(roles[role], text))
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
