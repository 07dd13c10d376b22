"""`roletune merge`: fold the adapter into the base weights and save a model any transformers user
loads with AutoModelForCausalLM + AutoTokenizer.

The merged model must answer like the adapter model: its logits are compared on a few prompts
before anything is written, and the folder appears only when complete (written aside, renamed).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from roletune import __version__
from roletune.card import write_merged_card
from roletune.decoding import Session, load_session, stop_token_ids, with_default_system, with_system
from roletune.errors import RunError
from roletune.run_dir import MERGE_RECORD, open_as_umask, open_run

# Largest |merged - adapter| logit difference a dtype explains, relative to the largest |logit|:
# fp32 differs only by summation order; fp16/bf16 round W + BA to 10/7 mantissa bits.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PROBES = ["你是谁？", "Hello! Who are you, and what do you do all day?", "今天天气怎么样？给我讲个故事吧。"]


def merge(location: str, out: str, *, dtype: str = "bf16", device: str = "auto", base_model: str | None = None,
          echo=print) -> Path:
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunError(f"{out}: exists and is not empty; choose a new --out")
    run = open_run(location, base_model)
    if not run.adapter:
        raise RunError(f"{location}: a plain model has no adapter to merge")
    # Always the unquantised base: folding the adapter into 4-bit weights would round it away, and a
    # QLoRA adapter is meant to be merged into the full-precision model it was quantised from.
    session = load_session(location, device=device, base_model=base_model, dtype=dtype, quantization="none",
                           fused=False)
    if run.model_cfg.quantization != "none":
        echo(f"the adapter trained on a {run.model_cfg.quantization} base; "
             f"merging it into the unquantised {dtype} base")
    inputs = probe_inputs(session)
    with torch.inference_mode():
        expected = session.model(**inputs).logits.float()
        merged = session.model.merge_and_unload()
        got = merged(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    diff = (got - expected).abs()[mask].max().item()
    allowed = RELATIVE_TOLERANCE[dtype] * max(expected.abs()[mask].max().item(), 1.0)
    echo(f"merged vs adapter logits on {len(PROBES)} prompts: max |diff| = {diff:.3g} (allowed for {dtype}: {allowed:.3g})")
    if not diff <= allowed:
        raise RunError(f"merge check failed: logits differ by {diff:.3g}, more than {dtype} explains ({allowed:.3g}); "
                       "nothing was written")
    session.model = merged
    record = {"base": run.base, "adapter": str(Path(run.adapter).resolve()), "dtype": dtype,
              "trained_quantization": run.model_cfg.quantization,
              "system_prompt": session.system_prompt, "max_abs_logit_diff": diff, "roletune": __version__}
    save_atomically(session, target, record, run.adapter)
    echo(f"merged model: {target}")
    return target


def probe_inputs(session: Session) -> dict:
    tokenizer = session.tokenizer
    texts = [tokenizer.apply_chat_template(with_system([{"role": "user", "content": p}], session.system_prompt),
                                           tokenize=False, add_generation_prompt=True) for p in PROBES]
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(session.device)


def save_atomically(session: Session, target: Path, record: dict, run: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        model = session.model
        model.generation_config.eos_token_id = stop_token_ids(model.generation_config, session.tokenizer)
        model.generation_config.pad_token_id = session.tokenizer.pad_token_id
        model.save_pretrained(scratch)  # safetensors, config.json, generation_config.json
        tokenizer = session.tokenizer  # the session ends with the merge
        # The template training used, opening with the persona where a conversation brings no system message.
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, session.system_prompt)
        tokenizer.save_pretrained(scratch)
        (scratch / MERGE_RECORD).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        write_merged_card(scratch, target, run, record)
        open_as_umask(scratch, recursive=True)  # made by mkdtemp (0700), with safetensors' files (0600)
        if target.exists():
            target.rmdir()  # checked empty above
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
