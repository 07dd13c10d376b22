"""Loss curves from hand-written trainer_state.json files: what is read, what is drawn, what is refused."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from roletune.errors import RoletuneError, RunError
from roletune.plot import loss_series, plot_runs, read_log_history, write_loss_png

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What Trainer logs: train loss every logging_steps, eval loss at evaluation, a summary without "loss" at the end.
HISTORY = [
    {"epoch": 0.5, "grad_norm": 1.9, "learning_rate": 2e-4, "loss": 2.75, "step": 10},
    {"epoch": 0.5, "eval_loss": 2.9, "eval_runtime": 0.4, "step": 10},
    {"epoch": 1.0, "grad_norm": 1.2, "learning_rate": 1e-4, "loss": 2.125, "step": 20},
    {"epoch": 1.0, "eval_loss": 2.5, "eval_runtime": 0.4, "step": 20},
    {"epoch": 1.0, "step": 20, "total_flos": 1.0e12, "train_loss": 2.4, "train_runtime": 12.3},
]


def write_state(folder: Path, history: list[dict], checkpoint: int | None = None) -> Path:
    """A trainer_state.json at the top of `folder`, or in folder/checkpoint-N."""
    where = folder / f"checkpoint-{checkpoint}" if checkpoint is not None else folder
    where.mkdir(parents=True, exist_ok=True)
    # json.dumps writes NaN/Infinity as Trainer's own save_to_json does.
    (where / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}),
                                              encoding="utf-8")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"  # the first chunk, by the PNG spec
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_runs saves, kept for inspection (lines, colours, legend) after the real save."""
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_top_level_state_is_read(tmp_path):
    run = write_state(tmp_path / "run", HISTORY)
    assert read_log_history(run) == HISTORY


def test_newest_checkpoint_wins_by_number_not_by_text(tmp_path):
    run = tmp_path / "run"
    write_state(run, HISTORY[:1], checkpoint=9)
    write_state(run, HISTORY[:3], checkpoint=10)  # sorts before checkpoint-9 as text
    (run / "checkpoint-11").mkdir()  # a checkpoint folder without a state (save interrupted) is passed over
    assert read_log_history(run) == HISTORY[:3]


def test_top_level_state_wins_over_checkpoints(tmp_path):
    run = write_state(tmp_path / "run", HISTORY)
    write_state(run, HISTORY[:1], checkpoint=10)
    assert read_log_history(run) == HISTORY


def test_loss_series_values():
    assert loss_series(HISTORY) == {"train": [(10, 2.75), (20, 2.125)], "eval": [(10, 2.9), (20, 2.5)]}


def test_non_finite_losses_are_skipped_after_a_round_trip_through_json(tmp_path, drawn):
    history = [{"loss": 3.0, "step": 1}, {"loss": float("nan"), "step": 2}, {"loss": float("inf"), "step": 3},
               {"loss": 2.0, "step": 4}, {"eval_loss": float("-inf"), "step": 4}, {"eval_loss": 2.5, "step": 4}]
    run = write_state(tmp_path / "run", history)
    assert loss_series(read_log_history(run)) == {"train": [(1, 3.0), (4, 2.0)], "eval": [(4, 2.5)]}
    write_loss_png(run)
    train_line = drawn[0].axes[0].get_lines()[0]
    assert list(train_line.get_xdata()) == [1, 4] and list(train_line.get_ydata()) == [3.0, 2.0]


def test_plot_writes_a_png_and_nothing_else(tmp_path, drawn):
    run = write_state(tmp_path / "run", HISTORY)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    out = write_loss_png(run)
    assert out == run / "loss.png"
    width, height = png_size(out)
    assert 200 <= height < width <= 4000
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "trainer_state.json"]  # no temp file left
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # the user's backend/pyplot state untouched

    axes = drawn[0].axes[0]
    train, evaluation = axes.get_lines()
    assert train.get_linestyle() == "-" and evaluation.get_linestyle() == "--"
    assert evaluation.get_marker() not in (None, "None", "")
    assert train.get_color() == evaluation.get_color()
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["run train", "run eval"]
    assert axes.get_title() and axes.get_xlabel() == "optimizer step" and axes.get_ylabel() == "loss"


def test_png_opens_in_pil(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    out = write_loss_png(write_state(tmp_path / "run", HISTORY))
    with image_module.open(out) as image:
        image.verify()
        assert image.format == "PNG"


def test_two_runs_overlay_in_two_colours_with_parent_names(tmp_path, drawn):
    first = write_state(tmp_path / "lr-2e-4" / "run", HISTORY)
    second = tmp_path / "lr-1e-3" / "run"
    write_state(second, HISTORY[:2], checkpoint=10)  # an interrupted run, read from its checkpoint
    out = plot_runs([first, second], tmp_path / "plots" / "compare.png")
    assert png_size(out)[0] > 0

    axes = drawn[0].axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "lr-2e-4/run train", "lr-2e-4/run eval", "lr-1e-3/run train", "lr-1e-3/run eval"]
    colours = [line.get_color() for line in axes.get_lines()]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert list(axes.get_lines()[2].get_xdata()) == [10]  # the second run's lone train point


def test_explicit_labels(tmp_path, drawn):
    runs = [write_state(tmp_path / name, HISTORY) for name in ("a", "b")]
    plot_runs(runs, tmp_path / "out.png", labels=["base", "tuned"])
    assert [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()][::2] == ["base train", "tuned train"]
    with pytest.raises(RunError, match="2 run folders but 1 labels"):
        plot_runs(runs, tmp_path / "out.png", labels=["base"])


def test_a_failed_save_leaves_the_previous_png_and_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = write_state(tmp_path / "run", HISTORY)
    (run / "loss.png").write_bytes(b"previous")

    def crash(self, file, **kwargs):
        file.write(PNG_SIGNATURE)  # half a PNG, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(KeyboardInterrupt):
        write_loss_png(run)
    assert (run / "loss.png").read_bytes() == b"previous"
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "trainer_state.json"]


def test_no_state_anywhere(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(RunError, match=r"run: no trainer_state\.json") as caught:
        read_log_history(run)
    assert "\n" not in str(caught.value)
    with pytest.raises(RunError, match="no such run folder"):
        read_log_history(tmp_path / "missing")


@pytest.mark.parametrize("checkpoint", [None, 7])
def test_bad_json(tmp_path, checkpoint):
    run = tmp_path / "run"
    where = run / f"checkpoint-{checkpoint}" if checkpoint else run
    where.mkdir(parents=True)
    (where / "trainer_state.json").write_text('{"log_history": [{"loss": 2.0,', encoding="utf-8")
    with pytest.raises(RunError, match="not valid JSON") as caught:
        read_log_history(run)
    assert str(where / "trainer_state.json") in str(caught.value) and "\n" not in str(caught.value)


def test_state_without_log_history(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text("[]", encoding="utf-8")
    with pytest.raises(RunError, match="no log_history"):
        read_log_history(run)


def test_run_without_any_loss_is_refused_and_nothing_is_written(tmp_path):
    good = write_state(tmp_path / "good", HISTORY)
    empty = write_state(tmp_path / "empty", [{"loss": float("nan"), "step": 1}, HISTORY[-1]])
    out = tmp_path / "both.png"
    with pytest.raises(RunError, match=r"empty: no finite train or eval loss"):
        plot_runs([good, empty], out)
    assert not out.exists()


def test_eval_only_run_is_plotted(tmp_path, drawn):
    run = write_state(tmp_path / "run", [HISTORY[1], HISTORY[3]])
    write_loss_png(run)
    (line,) = drawn[0].axes[0].get_lines()
    assert line.get_linestyle() == "--"


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch):
    run = write_state(tmp_path / "run", HISTORY)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(RoletuneError, match="pip install matplotlib"):
        write_loss_png(run)
