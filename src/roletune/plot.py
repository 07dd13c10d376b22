"""Loss curves of one or more runs, read from the Trainer's own log (`trainer_state.json`).

Where the log lives in a run folder:
  output_dir/trainer_state.json               the whole run; ASSUMED written there by `roletune train`
                                              at the end of training (`trainer.save_state()`)
  output_dir/checkpoint-N/trainer_state.json  the log up to step N; used when the run has no top-level
                                              one (interrupted, or trained before it was saved there)
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from roletune import run_dir
from roletune.errors import RoletuneError, RunError, first_line

STATE_NAME = "trainer_state.json"
LOSS_PNG = "loss.png"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def read_log_history(run: str | Path) -> list[dict]:
    """The Trainer's `log_history` of a run: train-loss, eval-loss and final-summary entries, in order."""
    path = _state_file(Path(run))
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise RunError(f"{path}: not valid JSON ({first_line(err)}); the file is damaged or half-written") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise RunError(f"{path}: no log_history list; not a Trainer state file")
    return history


def loss_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)]}; NaN/inf (a diverged step) is skipped."""
    return {"train": _series(log_history, "loss"), "eval": _series(log_history, "eval_loss")}


def plot_runs(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """One PNG: each run in its own colour, train loss solid, eval loss dashed with markers."""
    runs = [Path(run) for run in runs]
    if not runs:
        raise RunError("no run folders to plot")
    if labels is not None and len(labels) != len(runs):
        raise RunError(f"{len(runs)} run folders but {len(labels)} labels; give one label per run")
    labels = list(labels) if labels is not None else _default_labels(runs)
    # Read every run before drawing anything: one bad run means no PNG at all.
    series = [_losses_of(run) for run in runs]

    figure = _draw(series, labels)
    return _save_png(figure, Path(out))


def write_loss_png(run: str | Path) -> Path:
    """`run/loss.png` for a single run."""
    run = Path(run)
    return plot_runs([run], run / LOSS_PNG)


def _default_labels(runs: list[Path]) -> list[str]:
    """The folder name; `parent/name` for runs whose names collide (a/run, b/run)."""
    names = [run.resolve().name for run in runs]
    return [f"{run.resolve().parent.name}/{name}" if names.count(name) > 1 else name
            for run, name in zip(runs, names)]


def _state_file(run: Path) -> Path:
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    top = run / STATE_NAME
    if top.is_file():
        return top
    # Numeric order: checkpoint-10 is newer than checkpoint-9, though it sorts before it as text.
    checkpoints = [(int(match.group(1)), child / STATE_NAME) for child in run.iterdir()
                   if (match := _CHECKPOINT.fullmatch(child.name)) and (child / STATE_NAME).is_file()]
    if not checkpoints:
        raise RunError(f"{run}: no {STATE_NAME}, neither at the top nor in a checkpoint-N folder; "
                       "is this a roletune run folder?")
    return max(checkpoints)[1]


def _series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    points = []
    for entry in log_history:
        value, step = entry.get(key), entry.get("step")
        # bool is an int to Python; a number in a Trainer log never is.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, int):
            points.append((step, float(value)))
    return points


def _losses_of(run: Path) -> dict[str, list[tuple[int, float]]]:
    history = read_log_history(run)
    series = loss_series(history)
    if not series["train"] and not series["eval"]:
        raise RunError(f"{run}: no finite train or eval loss logged ({len(history)} log entries); "
                       "did training reach its first logging_steps?")
    return series


def _draw(series: list[dict[str, list[tuple[int, float]]]], labels: list[str]):
    try:
        # Figure + the Agg canvas, never pyplot: no global backend switch, no figure registry to leak into.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RoletuneError("plotting loss curves needs matplotlib: pip install matplotlib") from None

    figure = Figure(figsize=(8, 5), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (losses, label) in enumerate(zip(series, labels)):
        colour = f"C{index % 10}"  # matplotlib's default colour cycle, one colour per run
        if losses["train"]:
            steps, values = zip(*losses["train"])
            # A lone point is invisible as a bare line.
            axes.plot(steps, values, color=colour, linestyle="-", marker="o" if len(steps) == 1 else None,
                      label=f"{label} train")
        if losses["eval"]:
            steps, values = zip(*losses["eval"])
            axes.plot(steps, values, color=colour, linestyle="--", marker="o", label=f"{label} eval")
    axes.set_title(f"Loss: {labels[0]}" if len(labels) == 1 else f"Loss: {len(labels)} runs")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def _save_png(figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write aside and rename: a crash mid-write never leaves half a PNG (or spoils the previous one).
    with tempfile.NamedTemporaryFile("wb", dir=out.parent, prefix=f".{out.name}.", suffix=".tmp",
                                     delete=False) as tmp:
        try:
            figure.savefig(tmp, format="png")
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    run_dir.open_as_umask(Path(tmp.name))
    os.replace(tmp.name, out)
    return out
