"""Host time of a training step: what launching the operators of roletune's layer stack costs, against peft's.

On short role-play lines a 7B step is small enough that Python launching kernels, not the GPU's arithmetic,
can be what it waits on. This measures that cost alone: a Qwen2 with Qwen2.5-7B's 28 layers and seven
adapted projections each, but only 64 wide, trains on one short packed row, so its arithmetic is
negligible and a forward and backward (under bf16 autocast, as Trainer runs a GPU) takes what the host
spends issuing it. Variants, each built by roletune's own code: `peft` (the seed's stack: peft's LoRA
with its fp32 input copies and kept dropout, transformers' RMSNorm and MLP, sdpa), `roletune` (the defaults),
and roletune with one lever turned back at a time. Rounds interleave the variants; each figure is the
median over all of a variant's steps. Prints ms per step, operators per step (kernel launches on a GPU,
views left out; on the CPU a dropout is four operators, on CUDA one) and the ratio to peft's stack.

usage:
  python benchmarks/host_time.py                  # the CPU, one thread
  python benchmarks/host_time.py --device cuda    # the host of a GPU machine (the GPU itself idles)
options: --steps N per round (10), --rounds R (3), --threads T (CPU threads, 1), --tokens a,b,c (6,5,7),
  --compile (adds roletune with train.compile=layers: its host time once compiled, operators not counted)
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_speed import GROUPED, LEVERS  # the same lever names and overrides as the training-speed benchmark

from roletune.speed import attention
from roletune.training.trainer import clear_grads

# roletune's overrides per variant: peft's stack is every LoRA and activation lever turned back.
PEFT = ["lora.dtype=fp32", "lora.recompute_dropout=false", "lora.fused=false", "train.lean_activations=false",
        "model.attn_implementation=sdpa"]
VARIANTS = {"peft": PEFT, "roletune": [], **GROUPED, **{name: LEVERS[name] for name in (
    "unfused-lora", "kept-lora-dropout", "fp32-lora-inputs", "plain-norm-mlp", "sdpa-attention")}}
COMPILED = {"compile-layers": ["train.compile=layers"]}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "reshape", "expand", "unsqueeze", "squeeze", "detach", "alias",
         "as_strided", "slice", "select", "empty", "new_empty", "empty_strided", "permute", "split", "unbind"}


class Operators(TorchDispatchMode):
    """Counts the operators that run a kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def build(overrides: list[str], device: torch.device, dtype: str):
    """The model as `roletune train` builds it (train.build_model), on a random narrow base."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from roletune import train
    from roletune.config import config_from_dict

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    cfg = config_from_dict({"model": {"path": "narrow-qwen2", "dtype": dtype, "device": str(device)},
                            "data": {"path": "unused.json"}, "lora": {"r": 8, "alpha": 32, "dropout": 0.1},
                            "output_dir": "unused"}, overrides)
    train.load_base_model = lambda model_cfg, where, dtype: AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation="sdpa").to(where)
    return train.build_model(cfg, device, echo=lambda *_: None).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp32"],
                        help="bf16: bf16 weights under autocast, as on a GPU (default there); fp32: no autocast (the "
                             "CPU's default: its bf16 matmuls are slow arithmetic even at this width)")
    parser.add_argument("--tokens", default="6,5,7", help="lengths of the examples packed into the row")
    parser.add_argument("--compile", action="store_true", help="add roletune with train.compile=layers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    lengths = [int(n) for n in args.tokens.split(",")]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    ids = torch.randint(0, 512, positions.shape, device=device)
    # The examples' boundaries, as the packing collator adds them for a varlen model (sdpa ignores them).
    ends = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    boundaries = {"cu_seq_lens_q": ends, "cu_seq_lens_k": ends, "max_length_q": max(lengths),
                  "max_length_k": max(lengths)}
    variants = {**VARIANTS, **(COMPILED if args.compile else {})}
    models = {name: build(overrides, device, dtype_name) for name, overrides in variants.items()}
    # Cleared as roletune's Trainer clears them (trainer.clear_grads over the listed parameters): model.zero_grad()
    # walks the 2,333 modules of this stack (as many as the 7B model's) each step, host time a training step does
    # not spend.
    trainable = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}

    def step(model, name: str) -> None:
        inputs = {"input_ids": ids, "position_ids": positions, **boundaries}
        if name != "peft":  # as roletune's loss calls the model: with the packed batch's mask ready
            inputs = attention.without_mask_building(model, inputs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**inputs, labels=ids, use_cache=False).loss
        loss.backward()
        clear_grads(trainable[name])
        if device.type == "cuda":
            torch.cuda.synchronize()

    operators, compiling = {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        step(model, name)  # warm-up (for a compiled variant: compiling)
        if name in COMPILED:  # its kernels are not dispatched one by one: nothing comparable to count
            compiling[name] = time.perf_counter() - started
            continue
        counter = Operators()
        with counter:
            step(model, name)
        operators[name] = counter.count
    print(f"operators a step (exact; the timings follow): {operators}", flush=True)  # kept if a time limit cuts it
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, model in models.items():
            for _ in range(args.steps):
                started = time.perf_counter()
                step(model, name)
                times[name].append(time.perf_counter() - started)

    print(f"device {device}, {dtype}, torch {torch.__version__}, {args.threads} CPU thread(s), {sum(lengths)} tokens, "
          f"{args.rounds} rounds x {args.steps} steps")
    peer = statistics.median(times["peft"])
    print(f"{'variant':>18} | {'ms / step':>9} | {'operators':>9} | vs peft")
    for name in models:
        ms = statistics.median(times[name])
        print(f"{name:>18} | {1000 * ms:9.1f} | {operators.get(name, '-'):>9} | {ms / peer:.2f}")
    for name, seconds in compiling.items():
        print(f"{name}: first step (compiling) {seconds:.1f} s")
    print(f"host_speedup_vs_peft={peer / statistics.median(times['roletune']):.2f}")


if __name__ == "__main__":
    main()
