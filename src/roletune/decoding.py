"""Load a model for answering and decode with it: a run's adapter on its base (or the base, or a plain
model), decoding settings from the model's own generation config, answers in batches. The verbs that
answer (generate, chat, compare, eval, merge's check) and training's sample answers all decode here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch

from roletune.data.tokenize import end_of_turn_ids
from roletune.model import (
    check_weight_files,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from roletune.run_dir import open_run
from roletune.speed import levers


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


def load_session(location: str, *, device: str = "auto", base_only: bool = False, base_model: str | None = None,
                 system: str | None = None, dtype: str | None = None, quantization: str | None = None,
                 fused: bool = True, cuda_graphs: bool = False, echo=print) -> Session:
    """Load the base model once and the adapter on top (unless base_only).

    base_model: another copy of the run's base (a folder or hub id) in place of the one it records.
    dtype and quantization default to the run's: a QLoRA run answers on the quantised base it trained on.
    fused: the adapter's branches run as roletune.speed.lora_fused computes them, with fewer kernels and less
    Python per token than peft's forward (benchmarks/decode_time.py); False keeps peft's own forward (merge
    checks its result against peft's).
    cuda_graphs: replay each decoding step's layers from a CUDA graph (roletune.speed.decode_graphs), saying
    whether they can.
    """
    run = open_run(location, base_model)
    target = resolve_device(device)
    model_cfg = dataclasses.replace(run.model_cfg, path=run.base, tokenizer=run.tokenizer,
                                    dtype=dtype or run.model_cfg.dtype,
                                    quantization=quantization or run.model_cfg.quantization)
    adapted = bool(run.adapter) and not base_only
    if adapted:
        check_weight_files(run.adapter)  # before the base loads, which takes minutes for a large one
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, target, resolve_dtype(model_cfg.dtype, target))
    if adapted:
        model = load_adapter(model, run.adapter, run.model_cfg.allow_pickle)
    levers.for_decoding(model, fused=fused and adapted, cuda_graphs=cuda_graphs, echo=echo)
    model.eval()
    return Session(model, tokenizer, system if system is not None else run.system_prompt, adapted, target)


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
    if levers.decodes_from_graphs(session.model):
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


def with_default_system(template: str, system: str | None) -> str:
    """A chat template that opens every conversation without a system message with `system` (the persona),
    in place of the template's own default ("You are Qwen, created by Alibaba Cloud" for Qwen2.5): for a
    merged model, whose users render prompts with the template alone."""
    if not system:
        return template
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja string literal, quotes and escapes included
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif -%}" + template)


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
