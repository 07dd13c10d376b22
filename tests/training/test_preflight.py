"""Pre-flight: an unwritable folder or a full disk is one line, before the model is loaded or anything written."""
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from roletune import train
from roletune.cli import main
from roletune.config import load_config
from roletune.training import preflight

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the pre-flight checks")
    monkeypatch.setattr(train, "load_base_model", refuse)


def one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("roletune: error: ")
    return line


def test_a_full_disk_is_one_line_before_any_heavy_work(config_file, monkeypatch, capsys, no_model_loading):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 2**20, 2**20))
    config = config_file(train={"max_steps": 6, "save_steps": 2})
    line = one_line_error(capsys, "train", config)
    output_dir = load_config(config).output_dir
    assert line.startswith(f"roletune: error: {output_dir}: not enough free disk in ")
    assert "needed (3 checkpoints of " in line and "1.0 MiB free" in line and "train.save_total_limit" in line
    assert not Path(output_dir).exists()


def test_an_unwritable_folder_is_one_line_before_any_heavy_work(config_file, tmp_path, capsys, no_model_loading):
    if os.geteuid() == 0:  # root writes anywhere a mode allows; /proc takes no new files from anyone
        output_dir, where = "/proc/roletune-test/run", "/proc"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        output_dir, where = str(locked / "run"), str(locked)
    line = one_line_error(capsys, "train", config_file(output_dir=output_dir))
    assert line.startswith(f"roletune: error: {output_dir}: cannot write in {where} (")


def test_a_file_in_the_way_is_one_line(config_file, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    line = one_line_error(capsys, "train", config_file(output_dir=str(blocker / "run")))
    assert line == f"roletune: error: {blocker / 'run'}: {blocker} is a file, not a folder"


def test_the_estimate_counts_adapter_optimizer_and_the_checkpoints_kept(config_file):
    cfg = load_config(config_file(train={"max_steps": 10, "save_steps": 2, "save_total_limit": 2}))
    trainable = preflight.trainable_parameters(cfg)
    assert trainable > 0
    per_checkpoint = trainable * 12 + preflight.EXTRA_BYTES_PER_SAVE  # fp32 adapter + two AdamW moments
    adapter = trainable * 4 + preflight.EXTRA_BYTES_PER_SAVE
    # 5 saves, 2 kept; the third is complete before the oldest is rotated out.
    assert preflight.disk_needed(cfg, trainable, 10)[0] == 3 * per_checkpoint + adapter
    assert preflight.disk_needed(cfg, trainable, 1)[0] == per_checkpoint + adapter  # the last step saves too
    unlimited = load_config(config_file(train={"max_steps": 10, "save_steps": 2}))
    assert preflight.disk_needed(unlimited, trainable, 10)[0] == 5 * per_checkpoint + adapter
    assert preflight.planned_steps(load_config(config_file(train={"epochs": 2, "batch_size": 5, "grad_accum": 2})),
                                   12) == 4  # ceil(12 / 5) = 3 batches -> 2 steps per epoch


def test_a_run_with_room_passes(config_file):
    cfg = load_config(config_file())
    preflight.check(cfg, examples=12)
    assert shutil.disk_usage(preflight.existing_parent(cfg.output_dir)).free > 0
    assert not Path(cfg.output_dir).exists()  # checking writes nothing
