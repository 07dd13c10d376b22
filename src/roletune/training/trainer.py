"""roletune's Trainer (RoleTrainer, one class with each concern in a base of its own) and how it is set up:
arguments from the config, the device the user asked for (not Trainer's cuda:0), the collator, and
checkpoints that describe themselves."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.training_args import ParallelMode

from roletune import run_dir
from roletune.config import Config
from roletune.data.tokenize import Example
from roletune.model import resolve_dtype
from roletune.speed import attention
from roletune.training import distributed, stopping
from roletune.training.batching import (
    HeldOutLoss,
    ReplyLoss,
    length_multiple,
    make_collator,
    pad_packed,
    with_reply_index,
)
from roletune.training.checkpoints import AtomicCheckpoints
from roletune.training.epoch_order import EvenTail
from roletune.training.loss import head_loss_for
from roletune.training.progress import ProgressLines
from roletune.training.stopping import NonFiniteGuard
from roletune.training.time_spent import TimedWork, TimeSpent


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
        if device.type == "cpu":
            # accelerate names a CPU rank's device "cpu:0", which torch.load cannot map a checkpoint onto
            # (transformers before 5.2x resumes several CPU processes with map_location=args.device).
            device = torch.device("cpu")
        if device.type == "cuda" and self.parallel_mode != ParallelMode.DISTRIBUTED:
            device = torch.device(self.pinned_device)
            torch.cuda.set_device(device)
            self._n_gpu = 1
        return device


class StepBookkeeping:
    """Trainer mixin: Trainer's bookkeeping around each step, without the host work a GPU waits on.

    Every micro-batch, Trainer counts the model's parameters for its FLOP tally (transformers walks every
    module to set the embeddings apart); every optimizer step it lists them again to clip their gradients,
    and model.zero_grad() walks them once more. A 7B model with LoRA has 2,333 modules: on the 2-core CPU
    one walk takes about 2 ms of host time, spent between two steps, where a GPU waits for the next step's
    kernels. The count and the trainable parameters (the only ones with gradients) do not change while
    training, so both are taken once. The norm clipping returns is kept for NonFiniteGuard
    (`take_step_grad_norm`), which would otherwise compute it again. Sharded runs (FSDP, DeepSpeed) clip
    and zero through their engine, as Trainer does, and the guard computes its own norm. A packed batch's
    token count is taken from its size on the host rather than read back from the device.
    """

    _flos_per_token: int | None = None
    step_grad_norm = None  # this step's gradient norm, before clipping; NonFiniteGuard takes it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self._sharded():
            # Trainer calls model.zero_grad() (set_to_none) each step: the same, over the listed parameters.
            self.model.zero_grad = functools.partial(clear_grads, self._trainable)

    def _sharded(self) -> bool:
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def floating_point_ops(self, inputs) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs:
            return super().floating_point_ops(inputs)
        if self._flos_per_token is None:  # transformers' own formula, linear in the tokens, for one token
            self._flos_per_token = super().floating_point_ops({main: torch.zeros(1, 1, dtype=torch.long)})
        return self._flos_per_token * inputs[main].numel()

    def _clip_grad_norm(self, model):
        if self._sharded():
            return super()._clip_grad_norm(model)  # a sharded norm: the guard computes its own per rank
        self.step_grad_norm = self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)
        return self.step_grad_norm

    def _track_num_input_tokens(self, inputs):
        # A packed batch holds real tokens only: their count is its size, known on the host. Trainer counts
        # the tokens that differ from the pad id on the device and reads the count back, which makes the host
        # wait for the micro-batch's backward before it can queue the next one.
        main = getattr(self.model, "main_input_name", "input_ids")
        if "attention_mask" in inputs or main not in inputs or self.args.world_size > 1:
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += inputs[main].numel()

    def take_step_grad_norm(self):
        norm, self.step_grad_norm = self.step_grad_norm, None
        return norm


class GraphedLengths:
    """Trainer mixin for compiled code that replays CUDA graphs (train.compile_mode=reduce-overhead): each
    packed micro-batch is padded to a multiple of `length_multiple` tokens (batching.pad_packed), since a
    graph is recorded per input length, and each training step tells torch that a new one begins, so the
    graphs' memory from the last one may be reused. Tokens seen and FLOPs count the unpadded batch."""

    length_multiple = 1  # no padding, no graphs
    pad_id = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.length_multiple > 1:
            torch.compiler.cudagraph_mark_step_begin()
            inputs = pad_packed(inputs, self.length_multiple, self.pad_id)
        return super().training_step(model, inputs, num_items_in_batch)


def clear_grads(parameters: list, set_to_none: bool = True) -> None:
    """torch.nn.Module.zero_grad over `parameters` only."""
    for parameter in parameters:
        if parameter.grad is None:
            continue
        if set_to_none:
            parameter.grad = None
        else:
            parameter.grad.detach_().requires_grad_(False)
            parameter.grad.zero_()


def training_arguments(cfg: Config, device: torch.device, has_eval: bool = False) -> TrainingArguments:
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
        torch_compile=t.compile is True,  # train.compile=layers is done by speed.compiled_layers
        torch_compile_mode=t.compile_mode if t.compile is True else None,
        # Trainer's activation (formerly gradient) checkpointing stays at its default, off: it would switch
        # every layer on at train(), and model.checkpoint_first_layers checkpoints only the layers
        # memory.for_run asks for (FSDP runs alike: the flags travel with the layers). Not passed by name,
        # because the name changed within transformers 5.
        bf16=on_gpu and model_dtype == torch.bfloat16,
        fp16=on_gpu and model_dtype == torch.float16,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        eval_strategy=("steps" if cfg.eval.steps else "epoch") if has_eval else "no",
        eval_steps=cfg.eval.steps,
        per_device_eval_batch_size=t.batch_size,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s
        # Trainer's filter reads every micro-batch's loss back to replace a non-finite one in the logged
        # average, making the host wait for each backward. With on_nonfinite=stop such a loss ends the run
        # before the update (NonFiniteGuard), so only skip needs it.
        logging_nan_inf_filter=t.on_nonfinite == "skip",
        report_to="none",  # roletune's tracker adds its own callback (see track.py)
        # Batches are pinned (Trainer's default) and, with run_ahead, copied to the GPU without the host waiting
        # for the copy, and so for everything queued before it.
        accelerator_config={"non_blocking": on_gpu and t.run_ahead},
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **distributed.trainer_arguments(cfg, device),
    )


class RoleTrainer(TimedWork, StepBookkeeping, GraphedLengths, AtomicCheckpoints, EvenTail, HeldOutLoss, ReplyLoss,
                  Trainer):
    """transformers.Trainer as roletune trains with it. Each base adds one concern, and a method is looked up
    in this order:

    TimedWork (time_spent.py)           checkpoints and evaluation passes timed for the run's summary
    StepBookkeeping (here)              the per-step bookkeeping without walking the module tree
    GraphedLengths (here)               packed micro-batches padded to lengths CUDA graphs were recorded for
    AtomicCheckpoints (checkpoints.py)  checkpoint-N appears only complete, sealed by a manifest
    EvenTail (epoch_order.py)           a distributed epoch ends without repeated examples
    HeldOutLoss (batching.py)           the eval loss over every trained token of the held-out rows
    ReplyLoss (batching.py)             logits only where a label is (train.reply_logits_only)

    The non-finite guard is made here too, last among the callbacks, and given this step's gradient norm
    from clipping (StepBookkeeping.take_step_grad_norm).
    """

    def __init__(self, *, reply_logits_only: bool, head_loss, length_multiple: int, pad_id: int,
                 on_nonfinite: str, guard_runs_ahead: bool, checkpoint_extras=None, hold_for_tests=None,
                 time_spent: TimeSpent | None = None, callbacks=(), **trainer_arguments):
        self.reply_logits_only, self.head_loss = reply_logits_only, head_loss
        # The reply-only loss is normalised by the step's token count, not per micro-batch.
        self.loss_is_scaled_for_ga = True if reply_logits_only else None
        self.length_multiple, self.pad_id = length_multiple, pad_id
        self.checkpoint_extras, self.time_spent = checkpoint_extras, time_spent
        if hold_for_tests is not None:
            self.hold_for_tests = hold_for_tests
        guard = NonFiniteGuard(on_nonfinite, guard_runs_ahead, step_grad_norm=self.take_step_grad_norm)
        progress = [] if any(isinstance(c, ProgressLines) for c in callbacks) else [ProgressLines()]
        super().__init__(callbacks=[*progress, *callbacks, guard], **trainer_arguments)  # the guard last
        for printer in (PrinterCallback, ProgressCallback):  # their dicts of quoted numbers: ProgressLines instead
            self.remove_callback(printer)


def build_trainer(cfg: Config, model, tokenizer, train: list[Example], heldout: list[Example],
                  device: torch.device, callbacks: tuple = (), time_spent: TimeSpent | None = None,
                  cuda_graphs: bool = False) -> RoleTrainer:
    """The Trainer for this run. cuda_graphs: whether the layers' training steps replay CUDA graphs
    (layer_graphs.graphs_training, decided as the model was built), so micro-batches are padded for them."""
    # Flash kernels take the packed examples' boundaries from the batch, and sdpa has no use for them.
    boundaries = attention.active(model) in ("flash_attention_2", attention.VARLEN)
    t = cfg.train
    sharded = distributed.sharded(cfg)
    return RoleTrainer(
        model=model, args=training_arguments(cfg, device, bool(heldout)),
        train_dataset=[e.as_features() for e in train], eval_dataset=[e.as_features() for e in heldout] or None,
        processing_class=tokenizer, data_collator=with_reply_index(make_collator(tokenizer, t.packing, boundaries)),
        callbacks=callbacks, time_spent=time_spent,
        reply_logits_only=t.reply_logits_only,
        head_loss=head_loss_for(t.lm_head_loss, t.loss_chunk, device, sharded) if t.reply_logits_only else None,
        length_multiple=length_multiple(dataclasses.replace(t, cuda_graphs=cuda_graphs)),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        on_nonfinite=t.on_nonfinite, guard_runs_ahead=t.run_ahead and not sharded,  # untried on shards
        # The resolved config goes inside every checkpoint, under its manifest: any checkpoint is self-describing.
        checkpoint_extras=lambda folder: run_dir.write_config(folder, cfg),
        hold_for_tests=stopping.hold_for_tests)  # read now: a test may have put its own in place


def optimizer_steps(trainer: Trainer) -> int:
    """The number of optimizer steps, by Trainer's own arithmetic (not a formula of ours)."""
    values = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    return values[-1]
