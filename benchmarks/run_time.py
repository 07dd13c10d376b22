"""A whole `roletune train` run, timed end to end: the 3 epochs as a user runs them, not projected from
a stretch of steps.

Runs configs/huanhuan-qwen2.5-7b-fast.yaml as it ships (3 epochs, a checkpoint every 100 steps, sample
answers before training and after each epoch, the held-out eval each epoch, the tracker it names) on the
Qwen2.5-7B architecture with random weights (--tiny: the demo's tiny Qwen2, on the CPU), then prints the
run's own train_summary.json figures: the wall time of train() and its split into the optimizer steps,
sample answers, evaluation and checkpoints, and peak memory. The peer: the seed recipe, measured in the
same launch for --peer-steps optimizer steps, its step time times this run's optimizer steps (steps only,
so the ratio flatters the seed, whose real run also writes checkpoints and sample answers).

Random weights never say end-of-turn, so every sample answer runs to eval.max_new_tokens: the figure
for sample answers is the most they can cost with this config; a tuned model stops at its replies' end.

usage:
  python benchmarks/run_time.py                                  # the 7B architecture on the GPU
  python benchmarks/run_time.py --device cpu --tiny train.max_steps=40 --peer-steps 4
  python benchmarks/run_time.py --peer-steps 0 eval.samples=0    # what the run costs without sample answers
options: KEY=VALUE overrides (as `roletune train` takes them), --shared DIR, --out FILE.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from train_speed import ROOT, model_config_dir, random_base, run

CONFIG = ROOT / "configs" / "huanhuan-qwen2.5-7b-fast.yaml"
TIMES = ("wall_time_s", "steps_s", "sample_answers_s", "evaluation_s", "checkpoints_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings on top of the fast config")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny Qwen2 instead of Qwen2.5-7B")
    parser.add_argument("--peer-steps", type=int, default=10, help="the seed recipe's measured steps (0: no peer)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--model-config", help="folder with the model's config.json")
    parser.add_argument("--out", help="append the figures to this file as a JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config_dir = model_config_dir(args, scratch)
        peer = None
        if args.peer_steps:
            figures = scratch / "peer.jsonl"
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if args.device == "cpu" else
                       os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
            run([sys.executable, str(Path(args.shared) / "bench" / "seed_recipe.py"), "seed", str(config_dir),
                 str(args.peer_steps), str(figures), args.shared], env)
            peer = json.loads(figures.read_text().splitlines()[-1]) if figures.exists() else None
        row = whole_run(args, config_dir, scratch / "run")
    if peer:
        row["seed_s_projected"] = round(peer["step_s"] * row["optimizer_steps"], 1)
    report(row)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def whole_run(args, config_dir: Path, output_dir: Path) -> dict:
    """`roletune train` of the fast config, in this process, on random weights; its summary's figures."""
    import torch

    from roletune import train
    from roletune.config import load_config

    shared = Path(args.shared)
    device = "cuda:0" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    cfg = load_config(CONFIG, [f"model.path={config_dir}", f"model.tokenizer={shared / 'tokenizers' / 'qwen2.5'}",
                               f"model.device={device}", f"data.path={shared / 'data' / 'huanhuan.json'}",
                               f"output_dir={output_dir}", *args.overrides])
    train.load_base_model = random_base
    summary = train.run(cfg).summary
    return {"config": CONFIG.name, "model": config_dir.name, "overrides": args.overrides,
            "torch": torch.__version__, **{k: summary.get(k) for k in (
                "device", "optimizer_steps", "setup_s", *TIMES, "real_tokens_per_s", "peak_memory_gib", "peak_memory_kind",
                "gradient_checkpointing", "checkpointed_layers", "cuda_graphs", "final_train_loss",
                "final_eval_loss")}}


def report(row: dict) -> None:
    print("\n" + json.dumps(row, ensure_ascii=False))
    wall = row["wall_time_s"]
    print(f"\nwhole run on {row['device']}: {row['optimizer_steps']} optimizer steps in {wall} s; "
          + ", ".join(f"{k[:-2].replace('_', ' ')} {row[k]} s" for k in TIMES[1:])
          + f"; peak {row['peak_memory_gib']} GiB ({row['peak_memory_kind']}); before it, {row['setup_s']} s of "
          "setup (tokenizing, and the weights drawn at random where a run reads them)")
    if wall:
        print(f"steps_share={row['steps_s'] / wall:.2f}")
    if row.get("seed_s_projected") and wall:
        print(f"the seed recipe's steps alone: {row['seed_s_projected']} s")
        print(f"speedup_vs_seed_projection={row['seed_s_projected'] / wall:.2f}")


if __name__ == "__main__":
    main()
