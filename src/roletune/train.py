"""`roletune train`: the seed tutorial's pipeline, top to bottom.

load config -> build dataset -> build model + LoRA -> build Trainer -> train -> save -> summary.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from roletune import run_dir
from roletune.card import write_run_card
from roletune.config import Config
from roletune.data import Conversation, load_conversations, split_heldout
from roletune.data.tokenize import Example, TokenizeReport, mark_trained, tokenize_all
from roletune.errors import DataError
from roletune.model import (
    apply_lora,
    build_meta_model,
    check_lora_dtype,
    load_base_model,
    load_tokenizer,
    require_bitsandbytes,
    resolve_dtype,
)
from roletune.speed import levers
from roletune.training import checkpoints, distributed, memory, preflight
from roletune.training.progress import ProgressLines
from roletune.training.samples import SampleAnswers, sample_rows
from roletune.training.stopping import StopOnSignal, skipped_steps
from roletune.training.time_spent import TimeSpent
from roletune.training.track import Tracker, open_tracker
from roletune.training.trainer import build_trainer, optimizer_steps


@dataclass
class TrainingData:
    train: list[Example]
    report: TokenizeReport
    heldout_rows: list[Conversation] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    left_out: list[int] = field(default_factory=list)  # records with an empty prompt (data.strict=false)


@dataclass
class RunResult:
    output_dir: str
    optimizer_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, logged train loss)
    summary: dict = field(default_factory=dict)


def run(cfg: Config, *, resume: str | None = None, overwrite: bool = False, dry_run: bool = False,
        callbacks: tuple = (), echo=print) -> RunResult:
    time_spent = TimeSpent()  # the summary's split of the time: setup, then the steps and the work around them
    launch = distributed.current()  # one process, or one rank of torchrun / accelerate launch
    device = distributed.device_for(cfg.model.device, launch)
    cfg = distributed.resolve(cfg, launch, device)  # train.distributed checked; grad_accum from train.effective_batch
    cfg = run_dir.with_absolute_paths(cfg)  # the saved roletune.yaml then works from any folder
    if not launch.is_main:
        echo = distributed.quiet()  # rank 0 speaks and writes for the job
    tokenizer = load_tokenizer(cfg.model)
    data = build_dataset(cfg, tokenizer)
    echo_dataset(data, tokenizer, cfg, echo)
    if dry_run:
        return plan(cfg, tokenizer, data, device, echo)
    if launch.is_main:  # only rank 0 writes to output_dir, so only rank 0 checks it (never racing its writes)
        run_dir.check_output_dir(cfg.output_dir, resume, overwrite)
    checkpoint = checkpoints.find_checkpoint(cfg.output_dir, resume) if resume else None
    resumed_at = checkpoints.step_of(checkpoint) if checkpoint else None
    if checkpoint:
        echo(f"resuming from {checkpoint} (step {resumed_at})")
    if launch.is_main:
        preflight.check(cfg, len(data.train), checkpoint)

    # train.gradient_checkpointing=auto decided once, from the largest micro-batch of this run's data order on
    # this device: how many decoder layers to checkpoint. The saved config keeps what the user asked (auto);
    # the decision goes into train_summary.json.
    decision = memory.for_run(cfg, data.train, device, resolve_dtype(cfg.model.dtype, device))
    echo(decision.line())
    model = build_model(cfg, device, echo, decision.layers)
    if launch.is_main:
        prepare_output_dir(cfg, data, fresh=(overwrite or resume is not None) and checkpoint is None)
    tracker = open_tracker(cfg, resumed_at, echo) if launch.is_main else Tracker()
    samples = SampleAnswers(sample_rows(cfg, data.heldout_rows), tokenizer, cfg.data.system_prompt, tracker,
                            cfg.output_dir, cfg.eval.max_new_tokens, cfg.train.batch_size, echo,
                            every_rank=distributed.sharded(cfg), time_spent=time_spent)
    watchers = [c for c in (tracker.callback(), samples, ProgressLines(echo)) if c is not None]
    stop = StopOnSignal()  # Ctrl-C / SIGTERM: checkpoint at the step boundary, then Interrupted
    # Whether training steps replay CUDA graphs (train.cuda_graphs) was decided as the model was built: the
    # layers refuse them where this run cannot use them (on the CPU, with checkpointed layers, ...).
    trainer = build_trainer(cfg, model, tokenizer, data.train, data.heldout, device, (*watchers, stop, *callbacks),
                            time_spent, cuda_graphs=levers.training_from_graphs(model))
    try:
        time_spent.setup_done()
        started = time.perf_counter()
        with stop:
            trainer.train(resume_from_checkpoint=checkpoint)
        stop.raise_if_stopped(trainer)  # a run cut short is resumable, never saved as finished
        wall_s = time.perf_counter() - started
        save_run(cfg, trainer, tokenizer)
        if not launch.is_main:
            return RunResult(cfg.output_dir, trainer.state.global_step)
        result = finish(cfg, trainer, device, wall_s, time_spent, tracker.where, echo, decision)
        tracker.log_metrics({f"summary/{k}": v for k, v in result.summary.items() if isinstance(v, (int, float))},
                            trainer.state.global_step)
    finally:
        tracker.finish()
    return result


def build_dataset(cfg: Config, tokenizer) -> TrainingData:
    left_out: list[int] = []
    conversations = load_conversations(cfg.data, left_out)
    train_rows, heldout_rows = split_heldout(conversations, cfg.data.eval_size, cfg.train.seed, cfg.data.path)
    progress = (lambda rows: tqdm(rows, desc="tokenizing", file=sys.stderr)) if len(conversations) > 2000 else None
    train, report = tokenize_all(train_rows, tokenizer, cfg.data.max_length, cfg.data.train_on, progress)
    if not train:
        raise DataError(f"{cfg.data.path}: no example has a trained token left after truncation to "
                        f"data.max_length={cfg.data.max_length}")
    heldout, _ = tokenize_all(heldout_rows, tokenizer, cfg.data.max_length, cfg.data.train_on)
    return TrainingData(train, report, heldout_rows, heldout, left_out)


def echo_dataset(data: TrainingData, tokenizer, cfg: Config, echo) -> None:
    if data.left_out:
        echo(f"records: {len(data.left_out)} left out with an empty prompt (data.strict=true refuses them)")
    for line in data.report.lines(cfg.data.max_length):
        echo(line)
    if data.heldout_rows:
        echo(f"held out for evaluation: {len(data.heldout_rows)} rows (data.eval_size={cfg.data.eval_size:g})")
    echo("first example, trained tokens inside ⟦ ⟧:")
    echo(mark_trained(data.train[0], tokenizer))


def build_model(cfg: Config, device: torch.device, echo=print, checkpointed_layers: int = 0):
    set_seed(cfg.train.seed)  # LoRA's initial weights come from the global RNG, before Trainer seeds it
    dtype = resolve_dtype(cfg.model.dtype, device)
    check_lora_dtype(cfg.lora, dtype)
    base = load_base_model(cfg.model, distributed.load_device(cfg, device), dtype)
    base.config.use_cache = False  # a KV cache in training forwards defeats packed-sequence attention
    model = levers.for_training(base, cfg, checkpointed_layers=checkpointed_layers, sharded=distributed.sharded(cfg),
                                world_size=distributed.current().world_size, echo=echo)
    echo_trainable(model, echo)
    return model


def echo_trainable(model, echo) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    echo(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def prepare_output_dir(cfg: Config, data: TrainingData, fresh: bool) -> None:
    """Everything has been checked and loaded: only now is output_dir touched."""
    if fresh:
        run_dir.clear(cfg.output_dir)
    run_dir.write_config(cfg.output_dir, cfg)
    if data.heldout_rows:
        run_dir.write_heldout(cfg.output_dir, data.heldout_rows)


def plan(cfg: Config, tokenizer, data: TrainingData, device: torch.device, echo) -> RunResult:
    """Dry run: the model from its config on the meta device (no weights), LoRA, the step count and memory."""
    require_bitsandbytes(cfg.model)  # a quantised run would stop at loading; say so now
    model = apply_lora(build_meta_model(cfg.model), cfg.lora)
    echo_trainable(model, echo)
    placeholder = torch.nn.Linear(1, 1)  # Trainer's step arithmetic needs a module, not the meta model
    with tempfile.TemporaryDirectory() as scratch:  # Trainer creates its output_dir; keep the real one untouched
        trainer = build_trainer(dataclasses.replace(cfg, output_dir=scratch), placeholder, tokenizer, data.train,
                                data.heldout, torch.device("cpu"))
        steps = optimizer_steps(trainer)
    t = cfg.train
    processes = distributed.current().world_size
    echo(f"plan: {len(data.train)} examples, {t.batch_size} x {t.grad_accum}"
         f"{f' x {processes} processes' if processes > 1 else ''} per optimizer step, "
         f"{'max_steps ' + str(t.max_steps) if t.max_steps else f'{t.epochs:g} epochs'} "
         f"-> {steps} optimizer steps; checkpoint every {t.save_steps}")
    for line in memory.plan_lines(cfg, data.train, device):
        echo(line)
    echo(f"dry run: nothing was loaded or written; output_dir would be {cfg.output_dir}")
    return RunResult(cfg.output_dir, steps)


def save_run(cfg: Config, trainer, tokenizer) -> None:
    trainer.save_model(cfg.output_dir)  # on every rank: a sharded adapter is gathered, then rank 0 writes it
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(cfg.output_dir)
    trainer.state.save_to_json(str(Path(cfg.output_dir) / "trainer_state.json"))  # the loss history, for plots
    run_dir.write_config(cfg.output_dir, cfg)
    for path in Path(cfg.output_dir).glob("*.safetensors"):  # safetensors writes its files 0600
        run_dir.open_as_umask(path)


def finish(cfg: Config, trainer, device: torch.device, wall_s: float, time_spent: TimeSpent,
           tracker_where: str | None, echo, decision: memory.Decision) -> RunResult:
    """Write loss.png and train_summary.json, and print the summary."""
    from roletune.plot import loss_series, write_loss_png

    series = loss_series(trainer.state.log_history)
    out = Path(cfg.output_dir)
    picture = write_loss_png(out) if series["train"] or series["eval"] else None
    tokens = trainer.state.num_input_tokens_seen
    summary = {
        "wall_time_s": round(wall_s, 1),  # of train(); setup_s, before it, apart
        **time_spent.summary(wall_s),  # how much of it the steps took, and what the rest went to
        "optimizer_steps": trainer.state.global_step,
        "grad_accum": cfg.train.grad_accum,  # micro-batches a step: train.grad_accum, or from train.effective_batch
        "real_tokens": tokens,
        "real_tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "peak_memory_kind": "GPU allocated" if device.type == "cuda" else "process RSS",
        "estimated_peak_gib": round(decision.estimate.peak / memory.GiB, 2),
        "gradient_checkpointing": decision.checkpointing,
        "checkpointed_layers": decision.layers,  # the first this many decoder layers
        "cuda_graphs": levers.graphs_summary(trainer.model),  # train.cuda_graphs: recordings made, time spent
        "decoder_layers": decision.total_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final_train_loss": series["train"][-1][1] if series["train"] else None,
        "final_eval_loss": series["eval"][-1][1] if series["eval"] else None,
        "skipped_steps": skipped_steps(trainer.state.log_history) or None,  # train.on_nonfinite=skip
        "adapter": str(out / run_dir.ADAPTER_NAME),
        "loss_png": str(picture) if picture else None,
        "samples": str(out / "samples.jsonl") if (out / "samples.jsonl").exists() else None,
        "tracker": tracker_where,
    }
    (out / run_dir.SUMMARY_NAME).write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    write_run_card(out)  # README.md, in place of peft's blank one
    width = max(map(len, summary))
    for key, value in summary.items():
        if value is not None:  # the file keeps every digit; the screen, four decimals of a loss
            echo(f"{key:>{width}}: {f'{value:.4f}' if key.endswith('_loss') else value}")
    train = series["train"]
    if len(train) >= 2:
        (first_step, first), (last_step, last) = train[0], train[-1]
        echo(f"train loss {'fell' if last < first else 'did not fall'}: {first:.4f} at step {first_step} -> "
             f"{last:.4f} at step {last_step}")
    return RunResult(cfg.output_dir, trainer.state.global_step, train, summary)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

