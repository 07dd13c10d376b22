"""Host time between two training steps: Trainer's bookkeeping, roletune's against Trainer's own.

Between the end of one step's backward and the start of the next forward the host clips the gradients,
checks them (roletune's non-finite guard), steps the optimizer and the schedule, zeroes the gradients,
tallies FLOPs, runs the callbacks and collates the next batch. On a GPU the device has nothing queued
for part of that time, so it adds to every step. transformers walks the whole module tree several times
in there (2,333 modules for a 7B model with LoRA); roletune's trainer lists what it needs once
(roletune.training.trainer.StepBookkeeping). This trains a Qwen2 with Qwen2.5-7B's 28 layers but only 64
wide (arithmetic negligible) through `roletune train`'s own code, with roletune's bookkeeping and with
Trainer's (roletune's overrides removed), and prints the median host time between two steps and inside
a step, over alternating runs.

usage: python benchmarks/step_gap.py [--steps 30] [--rounds 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def narrow_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from roletune.demo.model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(folder / "tiny"))
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder / "narrow")
    tokenizer.save_pretrained(folder / "narrow")
    return folder / "narrow"


def measure(model: Path, folder: Path, steps: int, bookkeeping: str) -> tuple[list[float], list[float]]:
    """(gaps between steps, step times) in seconds, for one training run."""
    from roletune import train
    from roletune.config import config_from_dict
    from roletune.training import trainer

    rows = [{"instruction": f"第{i}个问题：" + "风" * (i % 7), "output": "好" * (1 + i % 5) + "。"} for i in range(400)]
    (folder / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = config_from_dict({
        "model": {"path": str(model), "device": "cpu"},
        "data": {"path": str(folder / "rows.json"), "system_prompt": "你是守灯人。", "max_length": 64},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1},
        "train": {"max_steps": steps, "batch_size": 16, "grad_accum": 1, "logging_steps": 10, "save_steps": 10_000,
                  "report_to": "none"},
        "output_dir": str(folder / f"run-{bookkeeping}")})
    marks: list[float] = []
    build = trainer.build_trainer

    def timed_trainer(*args, **kwargs):
        built = build(*args, **kwargs)
        if bookkeeping == "trainer":  # transformers' own methods, as if roletune's mixin were absent
            mixin = trainer.StepBookkeeping
            for name in ("floating_point_ops", "_clip_grad_norm", "_track_num_input_tokens"):
                setattr(built, name, getattr(super(mixin, built), name))
            del built.model.zero_grad  # back to torch.nn.Module.zero_grad
        step = built.training_step

        def training_step(*a, **k):
            marks.append(time.perf_counter())
            loss = step(*a, **k)
            marks.append(time.perf_counter())
            return loss
        built.training_step = training_step
        return built

    train.build_trainer = timed_trainer
    try:
        train.run(cfg, overwrite=True, echo=lambda *_: None)
    finally:
        train.build_trainer = build
    inside = [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]
    between = [marks[i + 1] - marks[i] for i in range(1, len(marks) - 1, 2)]
    return between[2:], inside[2:]  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = {"roletune": ([], []), "trainer": ([], [])}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = narrow_model(folder)
        for _ in range(args.rounds):
            for name, (between, inside) in figures.items():
                gaps, steps = measure(model, folder, args.steps, name)
                between += gaps
                inside += steps
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), 28 layers x 64 wide, {args.rounds} rounds x "
          f"{args.steps} steps")
    print(f"{'bookkeeping':>12} | {'ms between steps':>16} | {'ms in a step':>12}")
    for name, (between, inside) in figures.items():
        print(f"{name:>12} | {1000 * statistics.median(between):16.1f} | {1000 * statistics.median(inside):12.1f}")
    ours, theirs = (statistics.median(figures[name][0]) for name in ("roletune", "trainer"))
    print(f"between_steps_vs_trainer={ours / theirs:.2f}")


if __name__ == "__main__":
    main()
