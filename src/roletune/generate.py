"""Use what was trained: answer a file of prompts, chat in the terminal, compare the tuned model with its
base (each decoding as roletune.decoding does).

`generate_file` appends answers batch by batch and flushes, so an interrupted run keeps what it
finished; a rerun skips the prompts already answered in the output file.
"""
from __future__ import annotations

import json
import os
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


def chat(session: Session, config, *, prompt: str | None = None, context_tokens: int | None = None,
         read=input, write=None) -> list[dict]:
    """Interactive multi-turn chat with streamed replies; /reset, /system TEXT, /exit."""
    from transformers import TextStreamer

    write = write or (lambda text: print(text, flush=True))
    limit = context_tokens or getattr(session.model.config, "max_position_embeddings", 4096)
    budget = max(limit - config.max_new_tokens, 1)
    streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    if prompt is None:
        write("roletune chat: /reset clears the history, /system TEXT sets the system prompt, /exit quits")
    while True:
        if prompt is not None:
            line = prompt
        else:
            try:
                line = read("you> ")
            except EOFError:
                break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            write("(history cleared)")
            continue
        if command.startswith("/system"):
            session.system_prompt = command[len("/system"):].strip() or None
            write(f"(system prompt: {session.system_prompt or 'none'})")
            continue
        if not command:
            continue
        history = fit_history(session, history + [{"role": "user", "content": line}], budget)
        (reply,) = answer_batch(session, [history], config, streamer=streamer)
        history.append({"role": "assistant", "content": reply.text})
        if prompt is not None:
            break
    return history


def compare(session: Session, conversations: list[list[dict]], config, batch_size: int = 16) -> list[tuple]:
    """(base reply, tuned reply) per prompt: the adapter is switched off for the base answers."""
    if not session.has_adapter:
        raise RunError("compare needs a run or adapter folder; this is a plain model")
    with session.model.disable_adapter():
        base = answer_all(session, conversations, config, batch_size)
    tuned = answer_all(session, conversations, config, batch_size)
    return list(zip(base, tuned))
