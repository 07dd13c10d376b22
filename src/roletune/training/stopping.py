"""Stopping well. Ctrl-C or SIGTERM (pre-emption) ends training at the next step boundary with a
checkpoint; a NaN or infinite gradient norm stops training naming the step (or skips that update)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from roletune.errors import Interrupted, NonFiniteError
from roletune.training import checkpoints

log = logging.getLogger(__name__)

HOLD_ENV = "ROLETUNE_TEST_HOLD"
_signalled = False  # a stop signal arrived; also releases a test hold


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM while training: finish the optimizer step, save a checkpoint, stop.

    A second signal acts at once, the usual way. Install it around `trainer.train()` with `with`,
    then call `raise_if_stopped`: a run cut short must not be saved as if it had finished.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the signal this process received
        self.stopped = False  # training stopped early for a signal (here or in another process of the job)
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        global _signalled
        _signalled, self.signum, self.stopped = False, None, False
        if threading.current_thread() is threading.main_thread():  # Python sets handlers only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        global _signalled
        if self.signum is not None:  # the second one: stop now (KeyboardInterrupt, or termination)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum, _signalled = signum, True
        print(f"\nroletune: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
              "then stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if on_any_rank(self.signum is not None, args):  # every process must stop at the same step
            self.stopped = control.should_save = control.should_log = control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped:  # the checkpoint is saved; pre-emption leaves seconds, not an eval's worth
            control.should_evaluate = False

    def on_substep_end(self, args, state, control, **kwargs):
        hold_for_tests("substep", state.global_step + 1)  # between micro-batches: mid-step

    def raise_if_stopped(self, trainer) -> None:
        """After `trainer.train()`: Interrupted, naming the checkpoint, if a signal cut the run short."""
        state = trainer.state
        if not self.stopped or state.global_step >= state.max_steps:
            return  # no signal, or it came after the last step: the run is complete
        folder = Path(trainer.args.output_dir) / f"checkpoint-{state.global_step}"
        cause = signal.Signals(self.signum).name if self.signum else "a signal to another process of the job"
        raise Interrupted(f"stopped by {cause} after step {state.global_step} of {state.max_steps}; "
                          f"checkpoint saved: {folder}", self.signum or signal.SIGTERM)


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer update, check the gradient norm (a NaN or infinite loss leaves one
    behind too). `stop`: raise NonFiniteError naming the step, before the update, so every
    checkpoint already written stays good. `skip`: drop that update and count it.

    Reading the check on the host makes it wait, every step, for the GPU to finish the backward, and the
    GPU then waits for the host to queue the update and the next step. With `run_ahead` and an optimizer
    that can skip an update on the GPU (torch's fused Adam, AdamW, SGD and Adagrad, through the `found_inf`
    tensor GradScaler uses), it is not read then: the check is made on the GPU (or-ed over the ranks of a
    DDP run there, so that every rank skips the same updates), a bad step's update is skipped there, and
    the verdict is copied back without waiting and read at the next step's check, long after it arrived,
    or at once where the host waits anyway (a log, a checkpoint, an eval, the last step). Checkpoints stay
    good either way: none is written before the verdict is read. Sharded runs (FSDP, DeepSpeed) pass
    run_ahead=False. Install it after callbacks that can ask for a checkpoint at the end of a step
    (StopOnSignal).
    """

    def __init__(self, policy: str = "stop", run_ahead: bool = True, step_grad_norm=lambda: None):
        self.policy, self.run_ahead = policy, run_ahead
        # Where the trainer hands over the norm it already computed for this step (None: compute it here).
        self.step_grad_norm = step_grad_norm
        self._trainable: list | None = None  # listed once: walking the module tree every step costs host time
        self._pending: Verdict | None = None  # a step's check still on its way to the host

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        norm = self.step_grad_norm()
        if args.fp16:  # fp16's loss scaler expects overflowing steps: it skips them and lowers the scale itself
            return
        if norm is None:
            if self._trainable is None:
                self._trainable = [p for p in model.parameters() if p.requires_grad]
            grads = [_local(p.grad) for p in self._trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = torch.as_tensor(norm)
        step = state.global_step + 1
        skipper = on_device_skipper(optimizer) if self.run_ahead else None
        if skipper is not None:
            self.act_on_verdict(args, state)  # the previous step's verdict, long arrived
            bad = on_any_rank_on_device(~torch.isfinite(norm), args)  # every rank skips, or none
            skipper.found_inf = bad.float()  # 1: the fused update leaves parameters and moments as they are
            self._pending = Verdict(step, norm, bad)
            return
        if not on_any_rank(~torch.isfinite(norm), args):  # a sharded gradient can be bad on one rank only
            return
        self._judge(step, norm.item(), args, state)
        for parameter in model.parameters():
            parameter.grad = None  # skip: the optimizer leaves parameters without a gradient untouched

    def on_step_end(self, args, state, control, **kwargs):
        if (control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
                or state.global_step >= state.max_steps):
            self.act_on_verdict(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.act_on_verdict(args, state)  # before the epoch's sample answers and eval

    def on_train_end(self, args, state, control, **kwargs):
        self.act_on_verdict(args, state)

    def act_on_verdict(self, args, state) -> None:
        """Act on the pending verdict, if any (waiting for it if it has not arrived)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            norm, bad = pending.read()
            if bad:
                self._judge(pending.step, norm, args, state)

    def _judge(self, step: int, norm: float, args, state) -> None:
        """Step `step` had a non-finite gradient norm, and its update was not made: stop, or count it."""
        if self.policy == "stop":
            checkpoints.wait_for_seals()  # a checkpoint still being sealed in the background counts once it is in place
            good, _ = checkpoints.newest_good(args.output_dir)
            kept = f"the last good checkpoint is {good}" if good else "no checkpoint had been written yet"
            raise NonFiniteError(
                f"step {step}: the gradient norm is {norm} (a NaN or infinite loss or gradient); training "
                f"stopped before this update and {kept}; lower train.lr or check the data, or set "
                "train.on_nonfinite=skip to skip such steps")
        # Recorded in the log history, which checkpoints carry: the count survives a resume.
        state.log_history.append({"step": step, SKIPPED_KEY: str(norm)})
        skipped = skipped_steps(state.log_history)
        log.warning("step %d: the gradient norm is %s: update skipped (train.on_nonfinite=skip; %d skipped so far)",
                    step, norm, len(skipped))


class Verdict:
    """A step's gradient norm and whether it is non-finite, copied from the GPU to pinned host memory without
    the host waiting for it; `read` waits only for that copy (long done a step later)."""

    def __init__(self, step: int, norm: torch.Tensor, bad: torch.Tensor):
        self.step = step
        values = torch.stack([norm.detach().float().reshape(()), bad.float()])
        self.arrived = None
        if values.is_cuda:
            self.values = torch.empty(2, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.arrived = torch.cuda.Event()
            self.arrived.record()
        else:
            self.values = values

    def read(self) -> tuple[float, bool]:
        if self.arrived is not None:
            self.arrived.synchronize()
        norm, bad = self.values.tolist()
        return norm, bool(bad)


# torch optimizers whose fused implementation skips the update on the device where `found_inf` is 1.
_SKIPS_ON_DEVICE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def on_device_skipper(optimizer):
    """The torch optimizer under `optimizer` (accelerate wraps it) if it can skip an update on the device."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, _SKIPS_ON_DEVICE) and inner.defaults.get("fused"):
        return inner
    return None


SKIPPED_KEY = "skipped_nonfinite_grad_norm"


def skipped_steps(log_history: list[dict]) -> list[int]:
    """The optimizer steps whose update train.on_nonfinite=skip dropped."""
    return sorted({entry["step"] for entry in log_history if SKIPPED_KEY in entry})


def on_any_rank(flag, args) -> bool:
    """`flag` of this process, or-ed over every process of a distributed job (one tiny all-reduce a step)."""
    if not _several(args):
        return bool(flag)
    return bool(on_any_rank_on_device(torch.as_tensor(flag, device=args.device), args))


def on_any_rank_on_device(flag: torch.Tensor, args) -> torch.Tensor:
    """on_any_rank, left on the device: the all-reduce is queued, not waited for."""
    if not _several(args):
        return flag
    flag = flag.to(dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.bool()


def _several(args) -> bool:
    return args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard (DTensor)


def hold_for_tests(point: str, step: int) -> None:
    """Test-only kill point; without ROLETUNE_TEST_HOLD (always, outside tests) it does nothing.

    With ROLETUNE_TEST_HOLD=POINT:STEP (`substep:3` mid-step 3, `write:4` with checkpoint-4's files
    written aside, on the thread about to seal them) the process says so on stderr and waits there until
    a signal arrives, so a test can SIGKILL or SIGTERM it at that exact moment.
    """
    if os.environ.get(HOLD_ENV) != f"{point}:{step}":
        return
    checkpoints.wait_for_seals()  # a checkpoint sealed in the background is in place (or, holding inside its seal, left aside)
    print(f"roletune-test: holding at {point}:{step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while not _signalled and time.monotonic() < deadline:
        time.sleep(0.02)
