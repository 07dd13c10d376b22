"""Where a run's wall time went: optimizer steps, or the work around them (and, apart, the setup before).

On short role-play lines a 7B optimizer step is a fraction of a second, so the sample answers before
training and after each epoch, the evaluation passes and the checkpoints can take a large share of a
run; the summary says how much, so a user knows which setting to turn (eval.samples,
eval.max_new_tokens, train.save_steps, eval.steps). Each is timed on the host, from a point where the
GPU has finished the steps queued before it, so a step's GPU time is not charged to what follows it.
"""
from __future__ import annotations

import collections
import contextlib
import time

import torch

# What the summary reports besides the steps, in the order it prints them.
KINDS = ("sample_answers", "evaluation", "checkpoints")


class TimeSpent:
    def __init__(self):
        self.seconds = collections.Counter()
        self.began = time.perf_counter()  # the run's start: loading the tokenizer, data and model come first
        self.setup_s = None  # the time from `began` until training starts (setup_done)
        self.inside = collections.Counter()  # kind -> depth: work of a kind within the same kind counts once

    def setup_done(self) -> None:
        self.setup_s = time.perf_counter() - self.began

    @contextlib.contextmanager
    def on(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown kind of work {kind!r}; known: {', '.join(KINDS)}")
        if self.inside[kind]:
            yield
            return
        _wait_for_gpu()
        started = time.perf_counter()
        self.inside[kind] += 1
        try:
            yield
        finally:
            self.inside[kind] -= 1
            _wait_for_gpu()
            self.seconds[kind] += time.perf_counter() - started

    def summary(self, wall_s: float) -> dict:
        """Seconds per kind for train_summary.json; the steps get what the rest leaves of wall_s."""
        spent = {f"{kind}_s": round(self.seconds[kind], 1) for kind in KINDS}
        setup = {"setup_s": round(self.setup_s, 1)} if self.setup_s is not None else {}
        return {**setup, "steps_s": round(max(wall_s - sum(self.seconds.values()), 0.0), 1), **spent}


def _wait_for_gpu() -> None:
    # Only where CUDA is already in use: a CPU run must not initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TimedWork:
    """Trainer mixin: checkpoints and evaluation passes timed into `time_spent` (when one is set). A checkpoint
    counts the time the training thread spent on it: writing its files, and waiting for its seal
    (checkpoints.Sealing) only where the seal had not finished when the next checkpoint or the end came."""

    time_spent: TimeSpent | None = None

    def _save_checkpoint(self, model, trial) -> None:
        with self._timed("checkpoints"):
            return super()._save_checkpoint(model, trial)

    def wait_for_checkpoints(self) -> None:  # the seal of the newest checkpoint, on its own thread till now
        with self._timed("checkpoints"):
            return super().wait_for_checkpoints()

    def evaluate(self, *args, **kwargs):
        with self._timed("evaluation"):
            return super().evaluate(*args, **kwargs)

    def _timed(self, kind: str):
        return self.time_spent.on(kind) if self.time_spent is not None else contextlib.nullcontext()
