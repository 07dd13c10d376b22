"""Training progress as roletune shows it: a line per logging step (step, loss, learning rate, gradient
norm, tokens/s, time left) and per evaluation, under a progress bar where stderr is a terminal. It
replaces Trainer's own printing (ProgressCallback, PrinterCallback), which writes each log as a Python
dict of quoted numbers."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback

# Trainer's log keys a line leaves out: its own running totals (the line has tokens/s and time left).
UNSHOWN = {"epoch", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second", "total_flos"}


class ProgressLines(TrainerCallback):
    def __init__(self, echo=print, bar: bool | None = None):
        self.echo = echo
        self.bar_wanted = sys.stderr.isatty() if bar is None else bar
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.started, self.first_step = now, state.global_step  # a resumed run starts past step 0
        self.last = (now, state.num_input_tokens_seen)
        if state.is_world_process_zero and self.bar_wanted:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True, unit="step",
                            file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_loss" in logs:
            return  # train_loss: the log at the end of train(), which roletune's summary says better
        line = self.describe(logs, state)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.echo(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def describe(self, logs: dict, state) -> str:
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "eval_loss" in logs:
            return "  ".join([*parts, f"eval loss {logs['eval_loss']:.4f}"])
        now, tokens = time.perf_counter(), logs.get("num_input_tokens_seen")
        known = {"loss": "loss {:.4f}", "learning_rate": "lr {:.3g}", "grad_norm": "grad norm {:.3g}"}
        parts += [text.format(logs[key]) for key, text in known.items() if isinstance(logs.get(key), (int, float))]
        if tokens is not None and now > self.last[0]:
            parts.append(f"{(tokens - self.last[1]) / (now - self.last[0]):,.0f} tokens/s")
            self.last = (now, tokens)
        done = state.global_step - self.first_step
        if done > 0 and state.max_steps > state.global_step:
            parts.append(f"{_duration((now - self.started) / done * (state.max_steps - state.global_step))} left")
        rest = {k: v for k, v in logs.items() if k not in known and k not in UNSHOWN}
        parts += [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in rest.items()]
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
