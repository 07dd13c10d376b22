"""The demo's base model: a tiny Qwen2-architecture model with random weights, built offline.

It has the real Qwen2.5 vocabulary and chat template, so everything roletune does to it
(templates, masking, LoRA targets, stop tokens) is what it does to Qwen2.5-7B-Instruct.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_CONFIG = Path(__file__).with_name("tiny-qwen2.json")
# Qwen2.5-Instruct's published generation settings, so demo chats decode like the real model.
QWEN_GENERATION = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=True,
                       temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0,
                     **config) -> Path:
    """Write a random tiny Qwen2 (+ tokenizer) to out_dir; a finished folder is reused as is. `config` changes
    the demo's (hidden_size=256, say, for what needs rows of 256 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so an interrupted build never leaves a folder that looks finished.
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        if tokenizer_dir is None:
            from roletune.demo.tokenizer import build_qwen_tokenizer

            build_qwen_tokenizer(scratch)
        else:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(scratch)
        torch.manual_seed(seed)
        shape = Qwen2Config.from_json_file(TINY_CONFIG)
        shape.update(config)
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)
        model.generation_config = GenerationConfig(**QWEN_GENERATION)
        model.save_pretrained(scratch)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(scratch, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir
