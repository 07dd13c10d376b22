"""Checkpoint time: what a crash-safe checkpoint of the huanhuan recipe's adapter costs the training thread,
against transformers.Trainer's plain save.

A 3-epoch run of the recipe saves 7 checkpoints (every 100 of its 700 steps), each holding Qwen2.5-7B's
LoRA adapter (20,185,088 fp32 weights) and AdamW's two moments of it, about 240 MB; at roletune's speed a
step is a fraction of a second, so a checkpoint is worth several steps. This builds that adapter on the
Qwen2.5-7B architecture without its base weights (each a zero tensor expanded to its shape: no memory, and
saving an adapter never reads them), takes one AdamW step so the moments exist, and saves checkpoints
with the real Trainer code, the real Qwen2.5 tokenizer and roletune's checkpoint mixin:

  trainer          transformers.Trainer's own _save_checkpoint (the peer: no manifest, no atomic rename)
  roletune-inline  roletune's crash-safe checkpoint, sealed on the training thread (roletune until now)
  roletune         the same, sealed on a thread of its own while training goes on (roletune's default)

Printed per variant: the median time the training thread spends per checkpoint, and for roletune the
time its seal takes beside it; then, end to end, a checkpoint followed by a second of CPU-bound stand-in
steps (matrix products on every core, which a seal beside them competes with), sealed inline and beside.
Variants interleave, rounds give medians. On a GPU machine the training thread takes one core to launch
kernels, and the seal another.

usage: python benchmarks/checkpoint_time.py [--rounds 5] [--shared DIR] [--model-config DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_model(config_dir: Path):
    """Qwen2.5-7B with the seed's LoRA (r 8, alpha 32, its seven projections), base weights expanded zeros."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape),
                                                     requires_grad=False))
    for name, buffer in list(model.named_buffers()):  # rotary frequencies: computed, not loaded
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.register_buffer(name.rpartition(".")[2], torch.zeros(buffer.shape, dtype=buffer.dtype), persistent=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable


def trainers(model, tokenizer, folder: Path) -> dict:
    """The peer and roletune's trainer on the same model, each with one AdamW step taken."""
    from transformers import Trainer, TrainingArguments

    from roletune.training.checkpoints import AtomicCheckpoints

    class AtomicTrainer(AtomicCheckpoints, Trainer):  # roletune's checkpoint writing, nothing else of its Trainer
        pass

    built = {}
    for name, trainer_class in (("trainer", Trainer), ("roletune", AtomicTrainer)):
        args = TrainingArguments(output_dir=str(folder / name), use_cpu=True, report_to="none", save_strategy="steps",
                                 save_total_limit=3, learning_rate=1e-4, lr_scheduler_type="cosine")
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer)
        trainer.create_optimizer_and_scheduler(num_training_steps=700)
        built[name] = trainer
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.randn_like(param) * 1e-3
    for trainer in built.values():
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    model.zero_grad(set_to_none=True)
    return built


def save(trainer, model, step: int, seal: str | None) -> tuple[float, float]:
    """One checkpoint: seconds on the training thread, then seconds until its seal ended (0 if inline). `seal`:
    inline (waited for at once), background (waited for after), None (left running)."""
    trainer.state.global_step = step
    started = time.perf_counter()
    trainer._save_checkpoint(model, None)
    if seal == "inline":
        trainer.wait_for_checkpoints()
    on_thread = time.perf_counter() - started
    started = time.perf_counter()
    if seal == "background":
        trainer.wait_for_checkpoints()
    return on_thread, time.perf_counter() - started


def stand_in_steps() -> float:
    """A fixed amount of matrix products (stand_in_steps.reps of them, calibrated in main): seconds taken."""
    a = torch.randn(768, 768)
    started = time.perf_counter()
    for _ in range(stand_in_steps.reps):
        a = torch.tanh(a @ a.T / 768)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--model-config", help="folder with the model's config.json (default: Qwen2.5-7B's)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    shared = Path(args.shared)
    model, trainable = adapter_model(Path(args.model_config or shared / "models" / "qwen2.5-7b-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2.5")
    print(f"adapter: {trainable:,} trainable parameters; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        built = trainers(model, tokenizer, Path(scratch))
        times = {"trainer": [], "roletune-inline": [], "roletune": [], "seal": []}
        step = 0
        for _ in range(args.rounds):
            for variant, trainer, seal in (("trainer", built["trainer"], None),
                                           ("roletune-inline", built["roletune"], "inline"),
                                           ("roletune", built["roletune"], "background")):
                step += 100
                on_thread, sealing = save(trainer, model, step, seal)
                times[variant].append(on_thread)
                if seal == "background":
                    times["seal"].append(sealing)
        sizes = sum(f.stat().st_size for f in (Path(scratch) / "roletune" / f"checkpoint-{step}").iterdir())
        print(f"checkpoint: {sizes / 2**20:.0f} MiB in {len(list((Path(scratch) / 'roletune').glob('checkpoint-*')))}"
              " kept folders; median of", args.rounds, "rounds")
        median = {k: statistics.median(v) for k, v in times.items()}
        for variant in ("trainer", "roletune-inline", "roletune"):
            print(f"  {variant:16s} {median[variant] * 1000:7.0f} ms on the training thread")
        print(f"  {'':16s} {median['seal'] * 1000:7.0f} ms more for roletune's seal, beside the steps")

        # Sealing beside the steps takes a core from them (this machine's steps use every core): the real gain is
        # a checkpoint and the steps after it, end to end, sealed inline against sealed beside them.
        stand_in_steps.reps = 1
        while stand_in_steps() < 1.0:
            stand_in_steps.reps *= 2
        spans = {"inline": [], "background": []}
        for _ in range(args.rounds):
            for seal in spans:
                step += 100
                started = time.perf_counter()
                save(built["roletune"], model, step, seal if seal == "inline" else None)
                stand_in_steps()
                built["roletune"].wait_for_checkpoints()
                spans[seal].append(time.perf_counter() - started)
        alone = statistics.median(stand_in_steps() for _ in range(args.rounds))
        span = {k: statistics.median(v) for k, v in spans.items()}
        print(f"a checkpoint, then {alone:.2f} s of stand-in steps (matrix products on every core):")
        for seal in spans:
            print(f"  sealed {seal:10s} {span[seal]:.2f} s, the checkpoint's share {span[seal] - alone:.2f} s")
    print(f"checkpoint_speedup_vs_inline={median['roletune-inline'] / median['roletune']:.2f}")
    print(f"checkpoint_cost_vs_trainer={median['roletune'] / median['trainer']:.2f}")
    print(f"checkpoint_and_steps_speedup_vs_inline={span['inline'] / span['background']:.2f}")


if __name__ == "__main__":
    main()
