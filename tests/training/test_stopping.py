"""Stopping well: a NaN stops (or skips) naming the step; Ctrl-C / SIGTERM checkpoint and say how to resume."""
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from roletune import train
from roletune.cli import main, resume_command
from roletune.config import load_config
from roletune.errors import Interrupted, NonFiniteError
from roletune.training import checkpoints, stopping


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT as a terminal-started Python has it (KeyboardInterrupt). A test run started in the background by a
    non-interactive shell inherits SIGINT ignored, and a second Ctrl-C then does what the ignored signal does:
    nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class PoisonStep(TrainerCallback):
    """Make every activation NaN during optimizer step `step` (so its loss and gradients are NaN)."""

    def __init__(self, step: int):
        self.step, self.hook = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


class SendSignal(TrainerCallback):
    def __init__(self, step: int, signum: int, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.times):
                # To this thread, whose handler runs before raise_signal returns: a signal to the process may go to
                # another thread (tqdm's monitor, say) and be handled a moment later, and two pending ones merge.
                signal.raise_signal(self.signum)


@pytest.mark.slow
def test_a_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(config_file, monkeypatch):
    # checkpoint-2's seal is still running when step 3's NaN is found: the message must wait for it
    monkeypatch.setattr(stopping, "hold_for_tests", lambda point, step: time.sleep(1.0) if (point, step) == ("write", 2)
                        else None)
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2}))
    with pytest.raises(NonFiniteError) as caught:
        train.run(cfg, callbacks=(PoisonStep(3),))
    message = str(caught.value)
    assert message.startswith("step 3: the gradient norm is nan") and "\n" not in message, message
    out = Path(cfg.output_dir)
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in message
    assert "train.on_nonfinite=skip" in message
    assert checkpoints.problem(out / "checkpoint-2") is None
    assert not (out / "checkpoint-4").exists() and not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_skip_drops_exactly_the_poisoned_update(config_file, caplog):
    cfg = load_config(config_file(train={"max_steps": 4, "save_steps": 1, "on_nonfinite": "skip"}))
    with caplog.at_level(logging.WARNING):
        result = train.run(cfg, callbacks=(PoisonStep(3),))
    assert result.optimizer_steps == 4
    assert "step 3: the gradient norm is nan: update skipped (train.on_nonfinite=skip; 1 skipped so far)" in caplog.text
    out = Path(cfg.output_dir)
    adapters = {step: load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (2, 3, 4)}
    assert all(torch.equal(adapters[2][k], adapters[3][k]) for k in adapters[2])  # step 3 changed nothing
    assert not all(torch.equal(adapters[3][k], adapters[4][k]) for k in adapters[3])  # step 4 trained again
    optimizer = {step: torch.load(out / f"checkpoint-{step}" / "optimizer.pt") for step in (2, 3, 4)}
    moments = [t for s in optimizer[4]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in moments)  # no NaN reached AdamW's moments
    assert [s["step"] for s in optimizer[2]["state"].values()] == [s["step"] for s in optimizer[3]["state"].values()]
    final = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert result.summary["skipped_steps"] == [3]
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == [3]
    resumed = train.run(cfg, resume=str(out / "checkpoint-3"))  # the checkpoint's history keeps the count
    assert resumed.summary["skipped_steps"] == [3]


class KeepModel(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.mark.slow
@pytest.mark.parametrize("optim, run_ahead", [("adamw_torch_fused", True), ("adamw_torch_fused", False),
                                              ("adamw_torch", True)],
                         ids=["read-a-step-later", "waiting", "not-fused"])
def test_between_logs_a_nan_step_still_stops_before_its_update(config_file, optim, run_ahead):
    """With run_ahead and a fused optimizer the verdict on step 3 is read as step 4 ends its backward (no log
    or checkpoint at step 3 to read it sooner): step 3's update was skipped on the device, step 4's is
    never made. The others wait for the verdict before step 3's update."""
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2, "logging_steps": 100, "optim": optim,
                                         "run_ahead": run_ahead}))
    kept = KeepModel()
    with pytest.raises(NonFiniteError, match=r"^step 3: the gradient norm is nan \(") as caught:
        train.run(cfg, callbacks=(PoisonStep(3), kept))
    out = Path(cfg.output_dir)
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in str(caught.value)
    assert not (out / "checkpoint-4").exists() and not (out / "adapter_model.safetensors").exists()
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    now = get_peft_model_state_dict(kept.model)
    assert saved.keys() == now.keys()
    assert all(torch.equal(saved[k], now[k]) for k in saved)  # the model is step 2's


@pytest.mark.slow
def test_between_logs_skip_drops_the_nan_update_on_the_device(config_file, caplog):
    cfg = load_config(config_file(train={"max_steps": 4, "save_steps": 4, "logging_steps": 100,
                                         "on_nonfinite": "skip"}))
    with caplog.at_level(logging.WARNING):
        result = train.run(cfg, callbacks=(PoisonStep(3),))
    assert "step 3: the gradient norm is nan: update skipped (train.on_nonfinite=skip; 1 skipped so far)" in caplog.text
    assert result.summary["skipped_steps"] == [3]
    out = Path(cfg.output_dir)
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.pt")["state"]
    assert {float(s["step"]) for s in optimizer.values()} == {3.0}  # four steps, one of them skipped
    assert all(torch.isfinite(t).all() for s in optimizer.values() for t in s.values())
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


class SignalAtStart(TrainerCallback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_stop_signal_at_a_nan_step_does_not_checkpoint_it(config_file):
    """SIGTERM during step 3 asks for a checkpoint as it ends; the guard reads step 3's verdict first."""
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 100, "logging_steps": 100}))
    with pytest.raises(NonFiniteError, match="^step 3: "):
        train.run(cfg, callbacks=(PoisonStep(3), SignalAtStart(3, signal.SIGTERM)))
    assert not (Path(cfg.output_dir) / "checkpoint-3").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_step_boundary_and_the_run_resumes(config_file, capsys):
    before = signal.getsignal(signal.SIGINT)
    cfg = load_config(config_file(train={"max_steps": 5, "save_steps": 4}))
    out = Path(cfg.output_dir)
    with pytest.raises(Interrupted) as caught:
        train.run(cfg, callbacks=(SendSignal(2, signal.SIGINT),))
    # The signal came at the end of step 2, after the stop check: step 3 is finished and saved.
    assert str(caught.value) == f"stopped by SIGINT after step 3 of 5; checkpoint saved: {out / 'checkpoint-3'}"
    assert caught.value.exit_code == 130
    assert "SIGINT received: saving a checkpoint after this step" in capsys.readouterr().err
    assert checkpoints.problem(out / "checkpoint-3") is None
    assert not (out / "adapter_model.safetensors").exists()  # a cut-short run never looks finished
    assert signal.getsignal(signal.SIGINT) is before
    assert train.run(cfg, resume="latest").optimizer_steps == 5


class EvalSeen(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_a_stop_at_an_epoch_end_skips_that_epochs_eval_and_sample_answers(config_file):
    """Pre-emption leaves seconds: after the checkpoint nothing slow runs (eval, generation)."""
    cfg = load_config(config_file(data={"eval_size": 4}, train={"epochs": 2, "save_steps": 100}))
    evals = EvalSeen()
    with pytest.raises(Interrupted, match="after step 2 of 4"):  # 8 rows / 4 a step: step 2 ends epoch 1
        train.run(cfg, callbacks=(SendSignal(1, signal.SIGTERM), evals))
    assert evals.steps == []
    samples = (Path(cfg.output_dir) / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert samples and all('"epoch": 0' in line for line in samples)  # only those from before training
    assert checkpoints.problem(Path(cfg.output_dir) / "checkpoint-2") is None


def test_a_second_ctrl_c_stops_at_once(config_file):
    before = signal.getsignal(signal.SIGINT)
    cfg = load_config(config_file(train={"max_steps": 4, "save_steps": 100}))
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, callbacks=(SendSignal(1, signal.SIGINT, times=2),))
    assert signal.getsignal(signal.SIGINT) is before


def test_the_cli_prints_the_exact_resume_command_and_exits_143(config_file, monkeypatch, capsys):
    def preempted(cfg, **kwargs):
        raise Interrupted("stopped by SIGTERM after step 3 of 6; checkpoint saved: runs/x/checkpoint-3",
                          signal.SIGTERM)

    monkeypatch.setattr(train, "run", preempted)
    config = config_file()
    code = main(["train", str(config), "train.lr=1e-3", "--overwrite", "model.path=my model"])
    err = capsys.readouterr().err
    assert code == 143
    assert err.splitlines() == [
        "roletune: stopped by SIGTERM after step 3 of 6; checkpoint saved: runs/x/checkpoint-3; "
        f"resume with: roletune train {config} train.lr=1e-3 'model.path=my model' --resume"]


@pytest.mark.parametrize("argv, resume, expected", [
    (["train", "c.yaml"], None, "roletune train c.yaml --resume"),
    (["train", "c.yaml", "--resume", "runs/a/checkpoint-2", "x.y=1"], "runs/a/checkpoint-2",
     "roletune train c.yaml x.y=1 --resume"),
    (["train", "--overwrite", "c.yaml", "--resume=runs/a/checkpoint-2"], "runs/a/checkpoint-2",
     "roletune train c.yaml --resume"),
])
def test_resume_command(argv, resume, expected):
    assert resume_command(argv, SimpleNamespace(resume=resume)) == expected


def test_resume_command_inside_a_launch(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun on one machine: --nproc starts it again
    assert resume_command(["train", "c.yaml"], SimpleNamespace(resume=None)) == "roletune train c.yaml --nproc 4 --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines
    assert resume_command(["train", "c.yaml"], SimpleNamespace(resume=None)) == \
        "roletune train c.yaml --resume (on every machine, under your launcher)"
