"""Decoding time of a tuned model: roletune's adapter forward against peft's, with the base model as the floor.

Sample answers during training, `roletune generate`, `chat`, `compare` and `eval` decode one token per
forward. For a 7B model at a few prompts a batch a GPU does each step's arithmetic in a few milliseconds,
so a step takes what the host spends launching it, and peft's LoRA forward adds several operators and a
good deal of Python to each of the 196 adapted projections. This measures that host cost alone: a Qwen2
with Qwen2.5-7B's 28 layers and the seed's seven adapted projections each, but only 64 wide, decodes
greedily (every reply forced to the same length), loaded as `roletune generate` loads a run: the base,
peft's PeftModel.from_pretrained on top (`peft`), then roletune's fused branches (`roletune`). Rounds
interleave the variants; each figure is the median of its rounds. Prints ms per token, operators per
token, the ratio to peft's, and whether every variant with the adapter chose the same tokens. On a GPU a
fourth variant, `+cuda-graphs`, is roletune's with its decoding steps replayed from CUDA graphs
(--cuda-graphs: a static KV cache, roletune.speed.decode_graphs); its operators are those left outside the graph.

usage:
  python benchmarks/decode_time.py                 # the CPU, one thread
  python benchmarks/decode_time.py --device cuda   # the host of a GPU machine, bf16 weights
options: --tokens N per reply (32), --prompts P per batch (3), --rounds R (3), --threads T (1)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from host_time import Operators

from roletune.speed import layer_graphs


def build(folder: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A random narrow base and a LoRA adapter on it (lora_B drawn too, so the branch changes the answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, use_sliding_window=False)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.save_pretrained(folder / "base")
    tuned = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, weight in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    tuned.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def variants(base: Path, adapter: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Each model as `roletune generate` loads it (roletune.decoding.load_session: the base, the adapter, fused)."""
    from transformers import AutoModelForCausalLM

    from roletune.model import load_adapter
    from roletune.speed.lora_fused import fuse_lora_layers

    def load(adapted: bool, fused: bool):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
        if adapted:
            model = load_adapter(model, str(adapter))
            if fused:
                fuse_lora_layers(model)
        return model.eval()

    models = {"base": load(False, False), "peft": load(True, False), "roletune": load(True, True)}
    if device.type == "cuda":
        graphed = models["+cuda-graphs"] = load(True, True)
        print(layer_graphs.graph_decoding(graphed))
    return models


def decode(model, prompts: torch.Tensor, tokens: int) -> torch.Tensor:
    # As roletune.decoding.decoding_config asks for a model whose decoding steps are graphed.
    static = {"cache_implementation": "static", "disable_compile": True} if layer_graphs.installed(model) else {}
    with torch.inference_mode():
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0, eos_token_id=None,
                              **static)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as scratch:
        models = variants(*build(Path(scratch), dtype), device, dtype)
    prompts = torch.randint(1, 512, (args.prompts, 40), generator=torch.Generator().manual_seed(1)).to(device)
    answers, times, operators = {}, {name: [] for name in models}, {}
    for name, model in models.items():
        answers[name] = decode(model, prompts, args.tokens)  # warm-up, and the tokens chosen
        counter = Operators()
        with counter:
            decode(model, prompts, args.tokens)
        operators[name] = counter.count / args.tokens
    for _ in range(args.rounds):
        for name, model in models.items():
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            decode(model, prompts, args.tokens)
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / args.tokens)
    peft_ms = 1000 * statistics.median(times["peft"])
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'} ({dtype}), torch {torch.__version__}, "
          f"{args.prompts} prompts x {args.tokens} tokens, {args.rounds} rounds")
    print(f"{'variant':>9} | {'ms/token':>8} | {'ops/token':>9} | vs peft")
    for name in models:
        ms = 1000 * statistics.median(times[name])
        print(f"{name:>9} | {ms:8.2f} | {operators[name]:9.0f} | {ms / peft_ms:.2f}")
    print(f"same tokens, roletune and peft: {torch.equal(answers['roletune'], answers['peft'])}")
    if "+cuda-graphs" in models:
        print(f"same tokens, roletune with and without CUDA graphs: "
              f"{torch.equal(answers['roletune'], answers['+cuda-graphs'])}; "
              f"graphs: {layer_graphs.summary(models['+cuda-graphs'])['decoding']}")
    print(f"decode_speedup_vs_peft={peft_ms / (1000 * statistics.median(times['roletune'])):.2f}")
    if "+cuda-graphs" in models:
        print(f"decode_speedup_graphs_vs_eager="
              f"{statistics.median(times['roletune']) / statistics.median(times['+cuda-graphs']):.2f}")


if __name__ == "__main__":
    main()
