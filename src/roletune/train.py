"""`roletune train`: the seed tutorial's pipeline, top to bottom.

load config -> build dataset -> build model + LoRA -> build Trainer -> train -> save.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.training_args import ParallelMode

from roletune import run_dir
from roletune.config import Config
from roletune.data import load_conversations
from roletune.model import apply_lora, build_meta_model, load_base_model, load_tokenizer, resolve_device, resolve_dtype
from roletune.tokenize import IGNORE_INDEX, Example, TokenizeReport, mark_trained, tokenize_all


@dataclass
class RunResult:
    output_dir: str
    optimizer_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, logged train loss)


def run(cfg: Config, *, resume: str | None = None, overwrite: bool = False, dry_run: bool = False,
        callbacks: tuple = (), echo=print) -> RunResult:
    device = resolve_device(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model)
    examples, report = build_dataset(cfg, tokenizer)
    echo_dataset(report, examples, tokenizer, cfg, echo)
    if not dry_run:
        run_dir.check_output_dir(cfg.output_dir, resume, overwrite)
        checkpoint = run_dir.find_checkpoint(cfg.output_dir, resume) if resume else None
    if dry_run:
        return plan(cfg, tokenizer, examples, echo)

    set_seed(cfg.train.seed)  # LoRA's initial weights come from the global RNG, before Trainer seeds it
    model = apply_lora(load_base_model(cfg.model, device, resolve_dtype(cfg.model.dtype, device)), cfg.lora,
                       cfg.train.gradient_checkpointing)
    model.print_trainable_parameters()
    trainer = build_trainer(cfg, model, tokenizer, examples, device, callbacks)
    if overwrite and not resume:
        run_dir.clear(cfg.output_dir)
    run_dir.write_config(cfg.output_dir, cfg)
    trainer.train(resume_from_checkpoint=checkpoint)
    save_run(cfg, model, tokenizer)
    result = RunResult(cfg.output_dir, trainer.state.global_step, logged_losses(trainer.state.log_history))
    echo_result(result, echo)
    return result


def build_dataset(cfg: Config, tokenizer) -> tuple[list[Example], TokenizeReport]:
    conversations = load_conversations(cfg.data)
    examples, report = tokenize_all(conversations, tokenizer, cfg.data.max_length, cfg.data.train_on)
    if not examples:
        from roletune.errors import DataError
        raise DataError(f"{cfg.data.path}: no example has a trained token left after truncation to "
                        f"data.max_length={cfg.data.max_length}")
    return examples, report


def echo_dataset(report: TokenizeReport, examples: list[Example], tokenizer, cfg: Config, echo) -> None:
    for line in report.lines(cfg.data.max_length):
        echo(line)
    echo("first example, trained tokens inside ⟦ ⟧:")
    echo(mark_trained(examples[0], tokenizer))


@dataclass
class PinnedDeviceArguments(TrainingArguments):
    """TrainingArguments that keep a single-process run on the device roletune resolved.

    Trainer otherwise trains on cuda:0 whatever the user asked for, and wraps the model in
    DataParallel when several GPUs are visible (the seed's silent cuda:0). Distributed runs
    are untouched: there each rank's device comes from its local rank.
    """

    pinned_device: str = field(default="cpu", metadata={"help": "The device of a single-process run."})

    @functools.cached_property
    def _setup_devices(self) -> torch.device:
        device = TrainingArguments._setup_devices.func(self)
        if device.type == "cuda" and self.parallel_mode != ParallelMode.DISTRIBUTED:
            device = torch.device(self.pinned_device)
            torch.cuda.set_device(device)
            self._n_gpu = 1
        return device


def training_arguments(cfg: Config, device: torch.device) -> TrainingArguments:
    t = cfg.train
    on_gpu = device.type == "cuda"
    model_dtype = resolve_dtype(cfg.model.dtype, device)
    return PinnedDeviceArguments(
        pinned_device=str(device),
        output_dir=cfg.output_dir,
        use_cpu=not on_gpu,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing gives LoRA its gradients without hooks on the inputs.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=on_gpu and model_dtype == torch.bfloat16,
        fp16=on_gpu and model_dtype == torch.float16,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def build_trainer(cfg: Config, model, tokenizer, examples: list[Example], device: torch.device,
                  callbacks: tuple = ()) -> Trainer:
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    return Trainer(model=model, args=training_arguments(cfg, device), train_dataset=[e.as_features() for e in examples],
                   processing_class=tokenizer, data_collator=collator,
                   callbacks=[SaveConfigCallback(cfg), *callbacks])


class SaveConfigCallback(TrainerCallback):
    """Put the resolved config beside every checkpoint, so any checkpoint is self-describing."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            run_dir.write_config(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.cfg)


def optimizer_steps(trainer: Trainer) -> int:
    """The number of optimizer steps, by Trainer's own arithmetic (not a formula of ours)."""
    values = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    return values[-1]


def plan(cfg: Config, tokenizer, examples: list[Example], echo) -> RunResult:
    """Dry run: the model from its config on the meta device (no weights), LoRA, and the step count."""
    model = apply_lora(build_meta_model(cfg.model), cfg.lora)
    model.print_trainable_parameters()
    placeholder = torch.nn.Linear(1, 1)  # Trainer's step arithmetic needs a module, not the meta model
    with tempfile.TemporaryDirectory() as scratch:  # Trainer creates its output_dir; keep the real one untouched
        trainer = build_trainer(dataclasses.replace(cfg, output_dir=scratch), placeholder, tokenizer, examples,
                                torch.device("cpu"))
        steps = optimizer_steps(trainer)
    t = cfg.train
    echo(f"plan: {len(examples)} examples, {t.batch_size} x {t.grad_accum} per optimizer step, "
         f"{'max_steps ' + str(t.max_steps) if t.max_steps else f'{t.epochs:g} epochs'} "
         f"-> {steps} optimizer steps; checkpoint every {t.save_steps}")
    echo(f"dry run: nothing was loaded or written; output_dir would be {cfg.output_dir}")
    return RunResult(cfg.output_dir, steps)


def save_run(cfg: Config, model, tokenizer) -> None:
    model.save_pretrained(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    run_dir.write_config(cfg.output_dir, cfg)


def logged_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and math.isfinite(entry["loss"])]


def echo_result(result: RunResult, echo) -> None:
    echo(f"adapter: {Path(result.output_dir) / run_dir.ADAPTER_NAME}")
    if len(result.losses) >= 2:
        (first_step, first), (last_step, last) = result.losses[0], result.losses[-1]
        verdict = "fell" if last < first else "did not fall"
        echo(f"train loss {verdict}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
