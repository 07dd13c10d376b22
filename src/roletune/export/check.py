"""Checks of a written GGUF against the merged model it came from, before the export is called done."""
from __future__ import annotations

from pathlib import Path

import torch

from roletune.errors import RunError

# f16 and bf16 round the merged weights to 10 and 7 mantissa bits: their logits match within what merge's
# own check allows those dtypes, relative to the largest |logit|. q8_0 rounds them further, so it is held
# to the mean KL divergence of its next-token distributions from the merged model's (as llama.cpp measures
# quantization): 0.003 on the random-weight demo model, where a wrong model (the base without the adapter)
# gives 5.2. A k-quant's divergence grows with the spread of the weights, and random ones are far wider than
# a trained model's (q4_k_m: 0.26 on the demo model, 0.54 on one of hidden size 256), so a k-quant is only
# held to the same next token at half the positions or more (76-80% there; a wrong model 0%), which a
# broken file misses, and its divergence is reported.
RELATIVE_TOLERANCE = {"f16": 1e-2, "bf16": 5e-2}
MEAN_KL_BOUND = {"q8_0": 0.02}
SAME_NEXT_TOKEN_FLOOR = 0.5
REPLY_TOKENS = 32  # the greedy replies compared; enough to see the persona and the end of a short turn

def chat_template(gguf: Path) -> str | None:
    """The chat template a GGUF carries (tokenizer.chat_template), read with gguf-py's reader."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).get_field("tokenizer.chat_template")
    return field.contents() if field is not None else None


def logits(merged: Path, gguf: Path, quant: str, prompts: list[str], echo=print) -> dict:
    """Both models' logits on `prompts` (rendered with the merged model's chat template), the GGUF's through
    transformers' GGUF reader, in fp32; a RunError when they differ more than `quant` explains."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].bool()
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**inputs).logits[mask]
        # The weights are the GGUF's; the config is the merged model's, so that gguf-py parses the file's
        # metadata (a 151,665-token vocabulary, in Python) once, not twice: 13 s instead of 28 on the demo.
        reader = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      config=AutoConfig.from_pretrained(merged))
        got = reader(**inputs).logits[mask]
    diff = (got - want).abs().max().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
    found = {"max_abs_logit_diff": diff, "mean_kl": max(kl.sum(-1).mean().item(), 0.0),
             "same_next_token": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    if quant in RELATIVE_TOLERANCE:
        allowed = RELATIVE_TOLERANCE[quant] * max(want.abs().max().item(), 1.0)
        ok, bound = diff <= allowed, f"max |diff| = {diff:.3g} (allowed for {quant}: {allowed:.3g})"
    elif quant in MEAN_KL_BOUND:
        ok = found["mean_kl"] <= MEAN_KL_BOUND[quant]
        bound = f"mean KL {found['mean_kl']:.3g} (allowed for {quant}: {MEAN_KL_BOUND[quant]})"
    else:
        ok = found["same_next_token"] >= SAME_NEXT_TOKEN_FLOOR
        bound = f"mean KL {found['mean_kl']:.3g}; the same next token at {found['same_next_token']:.0%} of positions " \
                f"(at least {SAME_NEXT_TOKEN_FLOOR:.0%} for a k-quant)"
    if quant in MEAN_KL_BOUND or quant in RELATIVE_TOLERANCE:
        bound += f"; the same next token at {found['same_next_token']:.0%} of positions"
    echo(f"GGUF vs merged on {len(prompts)} prompts (transformers' GGUF reader): {bound}")
    if not ok:
        raise RunError(f"GGUF check failed: {bound}; nothing was written")
    return found


def replies(model, tokenizer, gguf: Path, conversations: list[list[dict]], *, lora: Path | None = None,
            echo=print) -> dict:
    """Greedy replies to `conversations` from llama.cpp's own runtime (the `llama_cpp` binding; `gguf` with the
    adapter `lora` on it, if given) and from `model` in transformers; a RunError when llama.cpp tokenizes a
    prompt otherwise than `tokenizer`, or ends a reply on another token than the template's end of turn (the
    seed's replies ended with <|endoftext|>)."""
    import llama_cpp

    end = _end_of_turn(tokenizer)
    texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
             for messages in conversations]
    prompts = [tokenizer(text).input_ids for text in texts]
    want = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=model.device), do_sample=False,
                                 max_new_tokens=REPLY_TOKENS, eos_token_id=end, pad_token_id=end, top_p=None,
                                 top_k=None, temperature=None)
            want.append(out[0, len(ids):].tolist())

    runtime = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None,
                              n_ctx=max(map(len, prompts)) + REPLY_TOKENS + 1, n_threads=torch.get_num_threads(),
                              verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(runtime.model)
    got, same, stopped = [], 0, 0
    for text, expected, prompt in zip(texts, want, prompts):
        ids = runtime.tokenize(text.encode(), add_bos=True, special=True)
        if ids != prompt:
            raise RunError("GGUF check failed: llama.cpp tokenizes the chat prompt otherwise than the model's "
                           "tokenizer; nothing was written")
        reply = []
        for token in runtime.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            reply.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(reply) == REPLY_TOKENS:
                break
        if llama_cpp.llama_vocab_is_eog(vocab, reply[-1]) and reply[-1] != end:
            ended, wanted = tokenizer.convert_ids_to_tokens([reply[-1], end])
            raise RunError(f"GGUF check failed: llama.cpp ended a reply with {ended}, not {wanted}; nothing was "
                           "written")
        got.append(tokenizer.decode(reply, skip_special_tokens=True))
        same += reply == expected
        stopped += reply[-1] == end
    runtime.close()
    found = {"prompts": [messages[-1]["content"] for messages in conversations], "same_reply": same,
             "stopped_at_end_of_turn": stopped, "end_of_turn": tokenizer.convert_ids_to_tokens(end), "replies": got,
             "model_replies": [tokenizer.decode(ids, skip_special_tokens=True) for ids in want]}
    echo(f"llama.cpp's greedy replies vs transformers' on {len(texts)} prompts ({REPLY_TOKENS} tokens at most): "
         f"{same} the same; {stopped} ended at {found['end_of_turn']}, none at another end token")
    return found


def adapter_metadata(gguf: Path, alpha: float) -> dict:
    """That a GGUF is a LoRA adapter for llama.cpp, with the run's alpha (llama.cpp scales by alpha / rank)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    found = {key: field.contents() if (field := reader.get_field(key)) is not None else None
             for key in ("general.type", "adapter.type", "adapter.lora.alpha")}
    if found != {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": alpha}:
        raise RunError(f"GGUF check failed: the adapter file says {found}, not a LoRA adapter of alpha {alpha}; "
                       "nothing was written")
    return found


def _end_of_turn(tokenizer) -> int:
    """The token a turn ends with: <|im_end|> in ChatML (Qwen's), else the tokenizer's end of sequence."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id


def reply_prompts(location: str) -> list[str]:
    """The prompts a run's sample answers were written for (eval.sample_prompts), else merge's probes."""
    from roletune.merge import PROBES
    from roletune.run_dir import CONFIG_NAME, read_config

    if (Path(location) / CONFIG_NAME).is_file():
        return list(read_config(Path(location)).eval.sample_prompts or PROBES)
    return PROBES
