"""Use what was trained: answer a file of prompts, chat in the terminal, compare the tuned model with its
base (each decoding as roletune.decoding does).

`generate_file` appends answers batch by batch and flushes, so an interrupted run keeps what it
finished; a rerun skips the prompts already answered in the output file.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from roletune.data.prompts import prompt_messages, read_prompts
from roletune.decoding import Session, answer_all, answer_batch, with_system
from roletune.errors import RunError


def generate_file(session: Session, config, input_path: str, output_path: str, batch_size: int = 16,
                  echo=print) -> int:
    """Answer every prompt of input_path not yet in output_path; returns how many were answered now."""
    records = read_prompts(input_path)
    done = answered_count(output_path, records)
    todo = records[done:]
    if done:
        echo(f"{output_path}: {done} of {len(records)} prompts already answered; resuming")
    if not todo:
        return 0
    with open(output_path, "a", encoding="utf-8") as out:
        def write_batch(start, replies):
            for record, reply in zip(todo[start:start + len(replies)], replies):
                out.write(json.dumps({**record, "response": reply.text}, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            echo(f"answered {done + start + len(replies)}/{len(records)}")

        answer_all(session, [prompt_messages(r) for r in todo], config, batch_size, on_batch=write_batch)
    return len(todo)


def answered_count(output_path: str, records: list[dict]) -> int:
    """How many leading prompts the output already answers; a torn last line is cut off."""
    path = Path(output_path)
    if not path.exists():
        return 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    if torn:  # the process died mid-line: drop the fragment so the file stays valid JSONL
        with open(path, "r+b") as handle:
            handle.truncate(len(raw) - len(torn))
    for number, line in enumerate(complete, start=1):
        try:
            answered = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{output_path}: line {number} is not JSON; not an output of this input") from None
        if number > len(records) or {k: v for k, v in answered.items() if k != "response"} != records[number - 1]:
            raise RunError(f"{output_path}: line {number} does not answer prompt {number} of the input; "
                           "use another --output")
    return len(complete)


def fit_history(session: Session, history: list[dict], budget: int) -> list[dict]:
    """Drop the oldest exchanges until the rendered prompt fits `budget` tokens (the last turn stays)."""
    kept = list(history)
    while len(kept) > 1:
        prompt = session.tokenizer.apply_chat_template(with_system(kept, session.system_prompt), tokenize=True,
                                                       add_generation_prompt=True)["input_ids"]
        if len(prompt) <= budget:
            break
        kept = kept[2:]  # one user turn and its reply
    return kept


CHAT_HELP = """/help          this list
/reset         clear the history
/system TEXT   set the system prompt (/system alone: none)
/exit          quit; so does Ctrl-D, or Ctrl-C twice at the prompt (Ctrl-C during a reply stops the reply)"""


def chat(session: Session, config, *, prompt: str | None = None, context_tokens: int | None = None,
         who: str = "the model", read=input, write=None) -> list[dict]:
    """Interactive multi-turn chat with streamed replies and the commands of CHAT_HELP; `who` names what
    answers (the tuned model, the base with its adapter off, a plain model) in the banner."""
    from transformers import TextStreamer

    write = write or (lambda text: print(text, flush=True))
    limit = context_tokens or getattr(session.model.config, "max_position_embeddings", 4096)
    budget = max(limit - config.max_new_tokens, 1)
    streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    if prompt is None:
        _edit_lines(read)
        write(f"roletune chat with {who}; /help lists the commands")
    interrupted = False  # the last key at the prompt was Ctrl-C
    while True:
        if prompt is not None:
            line = prompt
        else:
            try:
                line = read("you> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                if interrupted:
                    break
                interrupted = True
                write("\n(Ctrl-C again, or Ctrl-D, to quit)")
                continue
            interrupted = False
        command = line.strip()
        if command.startswith("/"):
            name, _, rest = command.partition(" ")
            if name in ("/exit", "/quit"):
                break
            if name == "/reset":
                history = []
                write("(history cleared)")
            elif name == "/system":
                session.system_prompt = rest.strip() or None
                write(f"(system prompt: {session.system_prompt or 'none'})")
            else:  # /help, and any other word: a mistyped command must not go to the model as a message
                write(CHAT_HELP if name == "/help" else f"(no command {name})\n{CHAT_HELP}")
            continue
        if not command:
            continue
        asked = fit_history(session, history + [{"role": "user", "content": line}], budget)
        try:
            (reply,) = answer_batch(session, [asked], config, streamer=streamer)
        except KeyboardInterrupt:  # this reply only: the exchange is left out of the history
            write("\n(reply stopped)")
            continue
        history = [*asked, {"role": "assistant", "content": reply.text}]
        if prompt is not None:
            break
    return history


def _edit_lines(read) -> None:
    """Line editing and in-session history (the arrow keys) for input() on a terminal, where Python has
    GNU readline or libedit: importing the module is what turns them on."""
    if read is input and sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # Windows has neither
            import readline  # noqa: F401


def compare(session: Session, conversations: list[list[dict]], config, batch_size: int = 16) -> list[tuple]:
    """(base reply, tuned reply) per prompt: the adapter is switched off for the base answers."""
    if not session.has_adapter:
        raise RunError("compare needs a run or adapter folder; this is a plain model")
    with session.model.disable_adapter():
        base = answer_all(session, conversations, config, batch_size)
    tuned = answer_all(session, conversations, config, batch_size)
    return list(zip(base, tuned))
