"""Trackers on a tiny run: SwanLab without a login writes a local run; TensorBoard writes events."""
import json
import sqlite3
from pathlib import Path

import pytest

from roletune import train
from roletune.config import load_config

SETTINGS = dict(data={"eval_size": 3}, train={"epochs": 2, "logging_steps": 1, "save_steps": 100},
                eval={"samples": 2, "max_new_tokens": 8})


@pytest.fixture(scope="module")
def swanlab_run(tmp_path_factory, tiny_model):
    """One run with report_to=swanlab and no SwanLab login anywhere (a fresh HOME)."""
    import os

    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"], old_home = str(home), os.environ.get("HOME")
    os.environ.pop("SWANLAB_API_KEY", None)
    try:
        yield _train(tmp_path_factory.mktemp("swan"), tiny_model, "swanlab")
    finally:
        os.environ["HOME"] = old_home or ""


def _train(folder: Path, tiny_model: Path, tracker: str):
    import yaml

    rows = [{"instruction": f"问题{i}：风大吗？", "output": f"风有{i}级。"} for i in range(11)]
    (folder / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model), "device": "cpu"},
           "data": {"path": str(folder / "rows.json"), "max_length": 48, **SETTINGS["data"]},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"lr": 1.0e-2, "batch_size": 4, "grad_accum": 1, "report_to": tracker, **SETTINGS["train"]},
           "eval": SETTINGS["eval"], "output_dir": str(folder / "run")}
    (folder / "c.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return train.run(load_config(folder / "c.yaml"), echo=lambda *_: None)


def logged(swanlog: Path, name: str) -> list:
    """Values SwanLab stored locally for a metric (its own database + per-metric log files)."""
    (database,) = swanlog.glob("runs.swanlab")
    with sqlite3.connect(database) as db:
        rows = db.execute("select folder from tag where name = ?", (name,)).fetchall()
    assert rows, f"{name} not logged"
    (run,) = swanlog.glob("run-*")
    lines = (run / "logs" / rows[0][0]).glob("*.log")
    return [json.loads(line)["data"] for path in lines for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_swanlab_without_login_keeps_a_local_run_with_the_losses(swanlab_run):
    swanlog = Path(swanlab_run.output_dir) / "swanlog"
    train_losses = logged(swanlog, "train/loss")
    assert train_losses == pytest.approx([loss for _, loss in swanlab_run.losses])
    assert len(logged(swanlog, "eval/loss")) == 2  # one per epoch
    assert logged(swanlog, "train/learning_rate") and logged(swanlog, "train/grad_norm")
    assert logged(swanlog, "train/train_tokens_per_second")
    assert len(logged(swanlog, "samples/0")) == 3  # before training and after each of 2 epochs
    (run,) = swanlog.glob("run-*")
    assert "max_length" in (run / "files" / "config.yaml").read_text(encoding="utf-8")


def test_samples_cover_the_start_and_every_epoch(swanlab_run):
    rows = [json.loads(line) for line in (Path(swanlab_run.output_dir) / "samples.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    heldout = [json.loads(line) for line in (Path(swanlab_run.output_dir) / "heldout.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows[:2]] == [h["messages"][-1]["content"] for h in heldout[:2]]
    assert all(isinstance(r["answer"], str) and isinstance(r["stopped"], bool) for r in rows)


def test_summary_and_loss_picture(swanlab_run):
    out = Path(swanlab_run.output_dir)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["optimizer_steps"] == swanlab_run.optimizer_steps == 4  # 8 rows / 4, 2 epochs
    assert summary["real_tokens"] > 0 and summary["real_tokens_per_s"] > 0 and summary["peak_memory_gib"] > 0
    assert summary["final_train_loss"] == pytest.approx(swanlab_run.losses[-1][1])
    assert summary["final_eval_loss"] is not None
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tensorboard_writes_events(tmp_path, tiny_model):
    result = _train(tmp_path, tiny_model, "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(result.output_dir) / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "train/loss" in tags["scalars"] and "eval/loss" in tags["scalars"]
    assert any(tag.startswith("samples") for tag in tags["tensors"])


@pytest.mark.slow
def test_a_tracker_that_cannot_start_does_not_stop_training(tmp_path, tiny_model, monkeypatch, caplog):
    import roletune.training.track as track

    def broken(cfg, *_):
        raise RuntimeError("dashboard exploded")

    monkeypatch.setattr(track, "SwanLabTracker", broken)
    result = _train(tmp_path, tiny_model, "swanlab")
    assert result.optimizer_steps == 4
    assert "could not start (dashboard exploded)" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["swanlab", "tensorboard"])
def test_a_resumed_run_continues_its_tracker_run(tmp_path, tiny_model, tracker, monkeypatch):
    from transformers import TrainerCallback

    from roletune.training.track import SwanLabTracker

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no SwanLab login: a local run
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    rows = [{"instruction": f"问题{i}：风大吗？", "output": f"风有{i}级。"} for i in range(11)]
    (tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    from roletune.config import config_from_dict

    cfg = config_from_dict({"model": {"path": str(tiny_model), "device": "cpu"},
                            "data": {"path": str(tmp_path / "rows.json"), "max_length": 48},
                            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "train": {"max_steps": 6, "save_steps": 2, "logging_steps": 1, "batch_size": 4,
                                      "report_to": tracker},
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, callbacks=(Interrupt(),), echo=lambda *_: None)
    out = Path(cfg.output_dir)
    first_id = (out / "swanlog" / SwanLabTracker.RUN_ID_NAME).read_text() if tracker == "swanlab" else None
    lines = []
    assert train.run(cfg, resume="latest", echo=lines.append).optimizer_steps == 6
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in lines
    if tracker == "swanlab":
        assert f"tracker: SwanLab run {first_id} continued from step 4" in lines
        assert all(folder.name.endswith(first_id) for folder in (out / "swanlog").glob("run-*"))
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert f"tracker: TensorBoard continues in {out / 'tensorboard'} from step 4" in lines
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_swanlab_says_where_its_run_is_once(tmp_path, tiny_model, monkeypatch, capfd):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    _train(tmp_path, tiny_model, "swanlab")
    out, err = capfd.readouterr()
    assert (out + err).count("swanlab watch") == 1, out + err
