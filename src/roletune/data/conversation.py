"""A conversation is a list of messages; every reader turns its records into one."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
# Record fields naming the character whose lines the assistant turns are, which `data from-script` writes
# and `roletune eval` reads; every layout's reader ignores them.
RECORDED_NAMES = ("character", "aliases")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


Conversation = list[Message]


def structure_problem(conversation: Conversation) -> str | None:
    """Why a conversation cannot be trained on, or None.

    The shape every chat template expects: an optional leading system message, then user and
    assistant turns alternating, ending with an assistant reply that is not empty.
    """
    turns = conversation[1:] if conversation and conversation[0].role == "system" else conversation
    if not turns:
        return "no user or assistant turns"
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            if message.role == "system":
                return f"turn {index}: a system message may only come first"
            if index == 0:
                return f"turn 0: the first turn must be the user's, got {message.role}"
            return f"turn {index}: two {message.role} turns in a row"
        if message.role == "assistant" and not message.content.strip():
            return f"turn {index}: empty reply"
    if turns[-1].role != "assistant":
        return "the conversation ends with a user turn; it must end with an assistant reply"
    return None
