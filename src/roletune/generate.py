"""Use what was trained: load a run for inference, decode like the model's own generation config,
answer prompts in batches, chat in the terminal, compare the tuned model with its base.

`generate_file` appends answers batch by batch and flushes, so an interrupted run keeps what it
finished; a rerun skips the prompts already answered in the output file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from roletune.data.prompts import prompt_messages, read_prompts
from roletune.data.tokenize import end_of_turn_ids
from roletune.errors import RunError
from roletune.model import load_adapter, load_base_model, load_tokenizer, resolve_device, resolve_dtype
from roletune.run_dir import open_run
from roletune.speed import layer_graphs
from roletune.speed.lora_fused import fuse_lora_layers


@dataclass
class Session:
    """A loaded model ready to answer, with the system prompt training used."""
    model: object
    tokenizer: object
    system_prompt: str | None
    has_adapter: bool
    device: torch.device


@dataclass
class Reply:
    text: str
    stopped: bool  # ended at end-of-turn / eos rather than at max_new_tokens
    tokens: int


def load_session(location: str, *, device: str = "auto", base_only: bool = False,
                 system: str | None = None, dtype: str | None = None, quantization: str | None = None,
                 fused: bool = True, cuda_graphs: bool = False, echo=print) -> Session:
    """Load the base model once and the adapter on top (unless base_only).

    dtype and quantization default to the run's: a QLoRA run answers on the quantised base it trained on.
    fused: the adapter's branches run as roletune.speed.lora_fused computes them, with fewer kernels and less
    Python per token than peft's forward (benchmarks/decode_time.py); False keeps peft's own forward (merge
    checks its result against peft's).
    cuda_graphs: replay each decoding step's layers from a CUDA graph (roletune.speed.decode_graphs), saying
    whether they can.
    """
    run = open_run(location)
    target = resolve_device(device)
    model_cfg = dataclasses.replace(run.model_cfg, path=run.base, tokenizer=run.tokenizer,
                                    dtype=dtype or run.model_cfg.dtype,
                                    quantization=quantization or run.model_cfg.quantization)
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, target, resolve_dtype(model_cfg.dtype, target))
    if run.adapter and not base_only:
        model = load_adapter(model, run.adapter, run.model_cfg.allow_pickle)
        if fused:
            fuse_lora_layers(model)
    if cuda_graphs:
        echo(layer_graphs.graph_decoding(model))
    model.eval()
    return Session(model, tokenizer, system if system is not None else run.system_prompt,
                   bool(run.adapter and not base_only), target)


def decoding_config(session: Session, *, greedy: bool = False, max_new_tokens: int = 512, **overrides):
    """The model's generation config (Qwen2.5: temperature 0.7, top-p 0.8, top-k 20, repetition
    penalty 1.05) with user overrides, stopping at the template's end-of-turn and every eos."""
    config = copy.deepcopy(session.model.generation_config)
    config.eos_token_id = stop_token_ids(config, session.tokenizer)
    config.pad_token_id = session.tokenizer.pad_token_id
    config.max_new_tokens = max_new_tokens
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if layer_graphs.installed(session.model):
        # Decoding steps are replayed from CUDA graphs, which a static cache's fixed shapes allow; generate
        # would compile the forward for it by itself, which the graphs make unneeded.
        config.cache_implementation, config.disable_compile = "static", True
    if greedy:
        config.do_sample = False
        config.temperature = config.top_p = config.top_k = None  # unused when greedy; avoids warnings
    return config


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Every eos of the generation config, the tokenizer's eos, and the template's end-of-turn."""
    eos = generation_config.eos_token_id
    stops = {*([eos] if isinstance(eos, int) else eos or []), *end_of_turn_ids(tokenizer)}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return sorted(stops)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def answer_batch(session: Session, conversations: list[list[dict]], config, streamer=None) -> list[Reply]:
    """One forward pass per batch: prompts rendered by the chat template, padded on the left."""
    tokenizer = session.tokenizer
    texts = [tokenizer.apply_chat_template(with_system(c, session.system_prompt), tokenize=False,
                                           add_generation_prompt=True) for c in conversations]
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                       return_tensors="pt").to(session.device)
    with torch.inference_mode():
        output = session.model.generate(**inputs, generation_config=config, streamer=streamer)
    stops = set(config.eos_token_id)
    replies = []
    for row in output[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[:end]
        replies.append(Reply(tokenizer.decode(kept, skip_special_tokens=True), end is not None, len(kept)))
    return replies


def answer_all(session: Session, conversations: list[list[dict]], config, batch_size: int = 16,
               on_batch=None) -> list[Reply]:
    replies = []
    for start in range(0, len(conversations), batch_size):
        batch = answer_batch(session, conversations[start:start + batch_size], config)
        if on_batch:
            on_batch(start, batch)
        replies.extend(batch)
    return replies


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
