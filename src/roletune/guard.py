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

from roletune import checkpoints
from roletune.errors import Interrupted, NonFiniteError

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
    checkpoint already written stays good. `skip`: drop that update and count it."""

    def __init__(self, policy: str = "stop"):
        self.policy = policy
        # Where the trainer hands over the norm it already computed for this step (None: compute it here).
        self.step_grad_norm = lambda: None
        self._trainable: list | None = None  # listed once: walking the module tree every step costs host time

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = self.step_grad_norm()
        if args.fp16:  # fp16's loss scaler expects overflowing steps: it skips them and lowers the scale itself
            return
        if norm is None:
            if self._trainable is None:
                self._trainable = [p for p in model.parameters() if p.requires_grad]
            grads = [_local(p.grad) for p in self._trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = torch.as_tensor(norm)
        if not on_any_rank(~torch.isfinite(norm), args):  # a sharded gradient can be bad on one rank only
            return
        step = state.global_step + 1
        if self.policy == "stop":
            good, _ = checkpoints.newest_good(args.output_dir)
            kept = f"the last good checkpoint is {good}" if good else "no checkpoint had been written yet"
            raise NonFiniteError(
                f"step {step}: the gradient norm is {norm.item()} (a NaN or infinite loss or gradient); training "
                f"stopped before this update and {kept}; lower train.lr or check the data, or set "
                "train.on_nonfinite=skip to skip such steps")
        for parameter in model.parameters():
            parameter.grad = None  # the optimizer leaves parameters without a gradient untouched
        # Recorded in the log history, which checkpoints carry: the count survives a resume.
        state.log_history.append({"step": step, SKIPPED_KEY: str(norm.item())})
        skipped = skipped_steps(state.log_history)
        log.warning("step %d: the gradient norm is %s: update skipped (train.on_nonfinite=skip; %d skipped so far)",
                    step, norm.item(), len(skipped))


SKIPPED_KEY = "skipped_nonfinite_grad_norm"


def skipped_steps(log_history: list[dict]) -> list[int]:
    """The optimizer steps whose update train.on_nonfinite=skip dropped."""
    return sorted({entry["step"] for entry in log_history if SKIPPED_KEY in entry})


def on_any_rank(flag, args) -> bool:
    """`flag` of this process, or-ed over every process of a distributed job (one tiny all-reduce a step)."""
    flag = torch.as_tensor(flag)
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = flag.to(device=args.device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard (DTensor)


def hold_for_tests(point: str, step: int) -> None:
    """Test-only kill point; without ROLETUNE_TEST_HOLD (always, outside tests) it does nothing.

    With ROLETUNE_TEST_HOLD=POINT:STEP (`substep:3` mid-step 3, `write:4` inside the write of
    checkpoint-4) the process says so on stderr and waits there until a signal arrives, so a test
    can SIGKILL or SIGTERM it at that exact moment.
    """
    if os.environ.get(HOLD_ENV) != f"{point}:{step}":
        return
    print(f"roletune-test: holding at {point}:{step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while not _signalled and time.monotonic() < deadline:
        time.sleep(0.02)
