"""Kill a real `python -m roletune train` process at chosen moments, then `--resume` it: the final
adapter and every logged loss are those of an uninterrupted run with the same seed.

Each moment is reached exactly with the test-only hold (ROLETUNE_TEST_HOLD, see training.stopping.hold_for_tests):
the process says where it is on stderr and waits there until the test signals it. All the runs of
one phase start together, so the file costs about two subprocess lifetimes on two cores.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from roletune.training import checkpoints

# Every test here launches, kills and resumes real training processes.
pytestmark = [pytest.mark.slow, pytest.mark.ranks]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TIMEOUT_S = 300

# name: (where the first run is held, the signal it then gets)
SCENARIOS = {
    "before_first_checkpoint": ("substep:1", signal.SIGKILL),  # mid step 1: nothing saved yet
    "mid_step": ("substep:3", signal.SIGKILL),  # checkpoint-2 saved, step 3 half accumulated
    "during_checkpoint_write": ("write:4", signal.SIGKILL),  # checkpoint-4 written aside, not yet in place
    "corrupt_newest": ("substep:5", signal.SIGKILL),  # checkpoint-4 saved, then damaged by the test
    "sigterm": ("substep:3", signal.SIGTERM),  # pre-emption: checkpoint at the step's end, exit 143
}


@dataclass
class Run:
    folder: Path
    config: Path
    process: subprocess.Popen | None = None
    first: dict = field(default_factory=dict)  # what the interrupted run left: exit code, stderr, files

    @property
    def output_dir(self) -> Path:
        return self.folder / "run"

    @property
    def stderr_path(self) -> Path:
        return self.folder / "stderr.txt"

    def start(self, *extra: str, hold: str | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("ROLETUNE_TEST_HOLD", None)
        if hold:
            env["ROLETUNE_TEST_HOLD"] = hold
        self.process = subprocess.Popen([sys.executable, "-m", "roletune", "train", str(self.config), *extra],
                                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(self.stderr_path, "w"))  # a file never fills up like a pipe

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, marker: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while marker not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"never reached {marker!r} (exit {self.process.returncode}):\n{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def finish(self) -> int:
        try:
            return self.process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"still running after {TIMEOUT_S} s:\n{self.stderr()[-3000:]}")


def make_run(folder: Path, tiny_model: Path) -> Run:
    folder.mkdir(parents=True)
    rows = [{"instruction": f"第{i}个问题：今天海上风大吗？", "output": f"风有{i}级，灯塔照常亮着。"} for i in range(12)]
    (folder / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model), "device": "cpu"},
           "data": {"path": str(folder / "train.json"), "system_prompt": "你是守灯人林小满。", "max_length": 64},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
           "train": {"max_steps": STEPS, "lr": 5.0e-3, "batch_size": 2, "grad_accum": 2, "logging_steps": 1,
                     "save_steps": 2, "seed": 7, "report_to": "none"},
           "output_dir": str(folder / "run")}
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return Run(folder, config)


def listing(folder: Path) -> set[str]:
    """The names in a run folder, and what is being written aside in it (.partial/checkpoint-N)."""
    aside = folder / checkpoints.STAGING
    return {p.name for p in folder.iterdir()} | \
        ({f"{aside.name}/{p.name}" for p in aside.iterdir()} if aside.is_dir() else set())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, Run]:
    """The uninterrupted run and every scenario, interrupted and then resumed."""
    base = tmp_path_factory.mktemp("kill")
    reference = make_run(base / "reference", tiny_model)
    scenarios = {name: make_run(base / name, tiny_model) for name in SCENARIOS}
    reference.start()
    for name, run in scenarios.items():
        run.start(hold=SCENARIOS[name][0])
    for name, run in scenarios.items():
        hold, signum = SCENARIOS[name]
        run.wait_for(f"roletune-test: holding at {hold}")
        run.process.send_signal(signum)
        run.first = {"code": run.finish(), "stderr": run.stderr(), "files": listing(run.output_dir)}
    damaged = scenarios["corrupt_newest"].output_dir / "checkpoint-4" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a torn write the manifest must catch
    for name, run in scenarios.items():
        resume = resume_argv(run) if name == "sigterm" else ["--resume"]
        run.start(*resume)
    assert reference.finish() == 0, reference.stderr()[-3000:]
    for run in scenarios.values():
        assert run.finish() == 0, run.stderr()[-3000:]
    return {"reference": reference, **scenarios}


def resume_argv(run: Run) -> list[str]:
    """The arguments of the resume command the interrupted run printed (after `roletune train CONFIG`)."""
    line = next(line for line in run.first["stderr"].splitlines() if "resume with: " in line)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["roletune", "train", str(run.config)], command
    return command[3:]


def adapter(run: Run) -> dict[str, torch.Tensor]:
    return load_file(run.output_dir / "adapter_model.safetensors")


def losses(run: Run) -> list[tuple[int, float]]:
    state = json.loads((run.output_dir / "trainer_state.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_after_an_interruption_ends_as_if_never_stopped(runs, name):
    want, got = adapter(runs["reference"]), adapter(runs[name])
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    expected = losses(runs["reference"])
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert [step for step, _ in losses(runs[name])] == [step for step, _ in expected]
    assert [loss for _, loss in losses(runs[name])] == pytest.approx([loss for _, loss in expected], abs=1e-5)


def test_a_kill_leaves_no_finished_looking_run(runs):
    for name in SCENARIOS:
        files = runs[name].first["files"]
        assert "adapter_model.safetensors" not in files and "train_summary.json" not in files, (name, files)
    assert runs["before_first_checkpoint"].first["files"] <= {"roletune.yaml", ".partial"}
    mid = runs["mid_step"].first["files"]
    assert "checkpoint-2" in mid and "checkpoint-4" not in mid
    # Killed inside the write of checkpoint-4: it exists only aside, where --resume never looks.
    during = runs["during_checkpoint_write"].first["files"]
    assert ".partial/checkpoint-4" in during and "checkpoint-4" not in during and "checkpoint-2" in during
    for name in ("mid_step", "during_checkpoint_write", "corrupt_newest"):
        assert runs[name].first["code"] == -signal.SIGKILL


def test_resume_before_any_checkpoint_starts_over_and_says_so(runs):
    assert "stopped before its first checkpoint; starting again from step 0" in runs["before_first_checkpoint"].stderr()


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(runs):
    err = runs["corrupt_newest"].stderr()
    assert "skipped checkpoint-4 (optimizer.pt has" in err and "resuming from checkpoint-2" in err, err[-2000:]
    # The resumed run wrote a good checkpoint-4 in place of the damaged one.
    assert checkpoints.problem(runs["corrupt_newest"].output_dir / "checkpoint-4") is None


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(runs):
    first = runs["sigterm"].first
    assert first["code"] == 128 + signal.SIGTERM
    last = first["stderr"].strip().splitlines()[-1]
    assert last.startswith("roletune: stopped by SIGTERM after step 3 of 6; checkpoint saved: ") and \
        last.endswith(f"resume with: roletune train {runs['sigterm'].config} --resume"), last
    assert "Traceback" not in first["stderr"]
    assert "checkpoint-3" in first["files"] and "adapter_model.safetensors" not in first["files"]


def test_every_checkpoint_of_a_run_verifies(runs):
    out = runs["reference"].output_dir
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(checkpoints.problem(p) is None for p in out.glob("checkpoint-*"))
    assert not (out / checkpoints.STAGING).exists()
