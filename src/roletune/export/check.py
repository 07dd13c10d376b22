"""Checks of a written GGUF against the merged model it came from, before the export is called done."""
from __future__ import annotations

from pathlib import Path

import torch

from roletune.errors import RunError

# f16 and bf16 round the merged weights to 10 and 7 mantissa bits: their logits match within what merge's
# own check allows those dtypes, relative to the largest |logit|. A quantized file rounds them further, so
# it is held to the mean KL divergence of its next-token distributions from the merged model's (as
# llama.cpp measures quantization): q8_0 gave 0.003 on the random-weight demo model, and a wrong model (the
# base without the adapter) 5.2.
RELATIVE_TOLERANCE = {"f16": 1e-2, "bf16": 5e-2}
MEAN_KL_BOUND = {"q8_0": 0.02}

def chat_template(gguf: Path) -> str | None:
    """The chat template a GGUF carries (tokenizer.chat_template), read with gguf-py's reader."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).get_field("tokenizer.chat_template")
    return field.contents() if field is not None else None


def logits(merged: Path, gguf: Path, quant: str, prompts: list[str], echo=print) -> dict:
    """Both models' logits on `prompts` (rendered with the merged model's chat template), the GGUF's through
    transformers' GGUF reader, in fp32; a RunError when they differ more than `quant` explains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].bool()
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**inputs).logits[mask]
        reader = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        got = reader(**inputs).logits[mask]
    diff = (got - want).abs().max().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
    found = {"max_abs_logit_diff": diff, "mean_kl": max(kl.sum(-1).mean().item(), 0.0),
             "same_next_token": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    if quant in RELATIVE_TOLERANCE:
        allowed = RELATIVE_TOLERANCE[quant] * max(want.abs().max().item(), 1.0)
        ok, bound = diff <= allowed, f"max |diff| = {diff:.3g} (allowed for {quant}: {allowed:.3g})"
    else:
        ok = found["mean_kl"] <= MEAN_KL_BOUND[quant]
        bound = f"mean KL {found['mean_kl']:.3g} (allowed for {quant}: {MEAN_KL_BOUND[quant]})"
    echo(f"GGUF vs merged on {len(prompts)} prompts (transformers' GGUF reader): {bound}; the same next token at "
         f"{found['same_next_token']:.0%} of positions")
    if not ok:
        raise RunError(f"GGUF check failed: {bound}; nothing was written")
    return found
