"""Conversation -> input_ids + labels: the one place where the loss mask is made.

The tokenizer's own chat template renders the whole conversation; the trained spans are
found by rendering prefixes of it, because most templates (Qwen2.5's among them) carry no
`{% generation %}` markers that transformers could use to return an assistant mask.
A trained span is an assistant message's content plus the template's end-of-turn token
(`<|im_end|>` for Qwen), so the model learns to stop; the newline after it is not trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from roletune.data.conversation import Conversation, Message
from roletune.errors import DataError

IGNORE_INDEX = -100  # the label value transformers' loss skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def as_features(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


@dataclass
class TokenizeReport:
    """What tokenization kept and dropped, printed before training."""
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def lines(self, max_length: int) -> list[str]:
        longest = max(self.lengths, default=0)
        mean = self.tokens / max(self.kept, 1)
        return [
            f"examples: {self.read} read, {self.kept} kept, {self.truncated} truncated to {max_length} tokens, "
            f"{self.dropped_no_target} dropped (no trained token left after truncation)",
            f"tokens: {self.tokens:,} in all, {self.trained_tokens:,} trained; "
            f"mean {mean:.1f} per example, longest {longest}",
        ]


def tokenize_conversation(conversation: Conversation, tokenizer, train_on: str) -> Example:
    """Render with the chat template and label the trained spans (no truncation here)."""
    text, spans = _trained_char_spans(conversation, tokenizer, train_on)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _with_labels(encoded["input_ids"], encoded["offset_mapping"], spans)


def tokenize_all(conversations: list[Conversation], tokenizer, max_length: int, train_on: str,
                 progress=None) -> tuple[list[Example], TokenizeReport]:
    """Tokenize, truncate to max_length, drop (and count) examples left with nothing to train."""
    report = TokenizeReport(read=len(conversations))
    rendered, specials = [], _special_tokens(tokenizer)  # once, not per row (a seventh of the time there)
    for index, conversation in enumerate(progress(conversations) if progress else conversations):
        try:
            rendered.append(_trained_char_spans(conversation, tokenizer, train_on, specials))
        except DataError as exc:
            raise DataError(f"record {index}: {exc}") from None
    # One call for all texts: a fast tokenizer encodes a batch on all cores.
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True) \
        if rendered else {"input_ids": [], "offset_mapping": []}
    examples = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        example = _with_labels(ids, offsets, spans)
        if len(example.input_ids) > max_length:
            report.truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        if trained == 0:
            report.dropped_no_target += 1
            continue
        examples.append(example)
        report.kept += 1
        report.tokens += len(example.input_ids)
        report.trained_tokens += trained
        report.lengths.append(len(example.input_ids))
    return examples, report


def _with_labels(input_ids, offsets, spans) -> Example:
    """A token is trained when it starts inside a trained character span."""
    labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
              for token, (begin, _) in zip(input_ids, offsets)]
    return Example(list(input_ids), labels)


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _trained_char_spans(conversation: Conversation, tokenizer, train_on: str, specials: list[str] | None = None):
    """The rendered text and the character spans of its trained turns. `specials`: _special_tokens(tokenizer),
    where the caller has it."""
    text = _render(tokenizer, conversation)
    if train_on == "all":
        return text, [(0, len(text))]
    if specials is None:
        specials = _special_tokens(tokenizer)
    turns = [i for i, message in enumerate(conversation) if message.role == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = _render(tokenizer, conversation[:i], add_generation_prompt=True)
        # Through the last message is the whole text: a third of the rendering saved on single-turn rows.
        through = text if i == len(conversation) - 1 else _render(tokenizer, conversation[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix "
                            "(e.g. it rewrites earlier turns), so the reply tokens cannot be located")
        spans.append((len(before), _turn_end(through, len(before), specials)))
    return text, spans


def _turn_end(rendered: str, start: int, specials: list[str]) -> int:
    """End of an assistant turn: through its end-of-turn token (one of `specials`), or its text without
    trailing space."""
    turn = rendered[start:]
    ends = [turn.find(token) + len(token) for token in specials if token in turn]
    return start + (min(ends) if ends else len(turn.rstrip()))


def _special_tokens(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return [t for t in specials if t]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that close an assistant turn under this chat template (stop tokens)."""
    probe = [Message("user", "x"), Message("assistant", "y")]
    text, [(start, end)] = _trained_char_spans(probe, tokenizer, "last")
    tail = text[start + 1:end]  # the turn after its one-character reply
    return [tokenizer.convert_tokens_to_ids(t) for t in _special_tokens(tokenizer) if tail.endswith(t)]


def mark_trained(example: Example, tokenizer, color: bool = False) -> str:
    """Decode an example with its trained spans wrapped in ⟦ ⟧ (or shown in green on a terminal)."""
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("⟦", "⟧")
    pieces, run, run_trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_wrap(tokenizer.decode(run), run_trained, open_, close))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_wrap(tokenizer.decode(run), run_trained, open_, close))
    return "".join(pieces)


def _wrap(text: str, trained: bool, open_: str, close: str) -> str:
    return f"{open_}{text}{close}" if trained else text
