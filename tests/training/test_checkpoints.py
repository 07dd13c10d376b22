"""Checkpoint manifests: what counts as complete, and which checkpoint --resume picks."""
import json
import logging
from pathlib import Path

import pytest

from roletune.errors import RunError
from roletune.training import checkpoints


def fake_checkpoint(folder: Path, step: int, sealed: bool = True) -> Path:
    """A checkpoint-N folder with a few files, sealed with its manifest unless told otherwise."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "optimizer.pt").write_bytes(bytes(range(256)) * 4)
    (path / "sub").mkdir()
    (path / "sub" / "rng_state.pth").write_bytes(b"rng")
    if sealed:
        checkpoints.write_manifest(path)
    return path


def test_a_sealed_checkpoint_verifies(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    assert checkpoints.problem(path) is None
    listed = json.loads((path / checkpoints.MANIFEST).read_text())["files"]
    assert sorted(listed) == ["optimizer.pt", "sub/rng_state.pth", "trainer_state.json"]
    assert listed["optimizer.pt"]["size"] == 1024 and len(listed["optimizer.pt"]["sha256"]) == 64


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "optimizer.pt").write_bytes(b"short"), "optimizer.pt has 5 bytes, the manifest says 1024"),
    (lambda p: (p / "optimizer.pt").write_bytes(bytes(1024)), "optimizer.pt does not match its sha256"),
    (lambda p: (p / "sub" / "rng_state.pth").unlink(), "sub/rng_state.pth is missing"),
    (lambda p: (p / checkpoints.MANIFEST).write_text("{not json"), "roletune_checkpoint.json is unreadable"),
    (lambda p: (p / checkpoints.MANIFEST).write_text('{"files": [1]}'), "roletune_checkpoint.json is unreadable"),
    (lambda p: (p / checkpoints.MANIFEST).unlink(), "no roletune_checkpoint.json: the save never finished"),
])
def test_damage_is_named(tmp_path, damage, reason):
    path = fake_checkpoint(tmp_path, 2)
    damage(path)
    assert checkpoints.problem(path) == reason


def test_resume_takes_the_newest_good_checkpoint_and_warns_about_newer_broken_ones(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    (fake_checkpoint(tmp_path, 12) / "optimizer.pt").write_bytes(b"torn")
    fake_checkpoint(tmp_path, 14, sealed=False)
    with caplog.at_level(logging.WARNING):
        found = checkpoints.find_checkpoint(str(tmp_path), "latest")
    assert found == str(tmp_path / "checkpoint-10")  # by step number, not name order (checkpoint-2 > checkpoint-10)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skipped checkpoint-14 (no roletune_checkpoint.json" in warning
    assert "checkpoint-12 (optimizer.pt has 4 bytes" in warning and warning.endswith("resuming from checkpoint-10")


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    fake_checkpoint(tmp_path, 4, sealed=False)
    with pytest.raises(RunError, match=r"no complete checkpoint to resume from: checkpoint-4 \(no roletune_checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path), "latest")


def test_a_named_checkpoint_must_verify_if_it_has_a_manifest(tmp_path, caplog):
    broken = fake_checkpoint(tmp_path, 4)
    (broken / "trainer_state.json").write_text("{}")
    with pytest.raises(RunError, match="incomplete or corrupt checkpoint .trainer_state.json has 2 bytes"):
        checkpoints.find_checkpoint(str(tmp_path), str(broken))
    legacy = fake_checkpoint(tmp_path, 6, sealed=False)  # e.g. written by plain transformers
    with caplog.at_level(logging.WARNING):
        assert checkpoints.find_checkpoint(str(tmp_path), str(legacy)) == str(legacy)
    assert "cannot be verified; resuming from it as asked" in caplog.text


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, caplog):
    (tmp_path / "roletune.yaml").write_text("model: {}")
    (tmp_path / checkpoints.STAGING / "checkpoint-2").mkdir(parents=True)  # killed while writing it
    with caplog.at_level(logging.WARNING):
        assert checkpoints.find_checkpoint(str(tmp_path), "latest") is None
    assert "starting again from step 0" in caplog.text
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # a finished run is never silently restarted
    with pytest.raises(RunError, match="no checkpoint-N folder to resume from"):
        checkpoints.find_checkpoint(str(tmp_path), "latest")


def test_publishing_replaces_an_older_folder_of_the_same_step(tmp_path):
    old = fake_checkpoint(tmp_path, 4, sealed=False)
    (old / "stale.txt").write_text("from a run that was resumed from an earlier checkpoint")
    staging = fake_checkpoint(tmp_path / checkpoints.STAGING, 4, sealed=False)
    checkpoints.publish(staging, old)
    assert not staging.exists() and not (old / "stale.txt").exists()
    assert checkpoints.problem(old) is None


@pytest.mark.slow
def test_the_tokenizer_is_serialised_once_and_every_checkpoint_holds_its_files(config_file, monkeypatch):
    """Trainer saves the tokenizer into each checkpoint; roletune serialises it once and writes the same bytes
    after: each checkpoint's tokenizer files are what save_pretrained writes, and their manifests verify."""
    import filecmp

    from transformers import AutoTokenizer

    from roletune import train
    from roletune.config import load_config

    calls = []
    tokenizer_class = type(AutoTokenizer.from_pretrained(str(load_config(config_file()).model.path)))
    save = tokenizer_class.save_pretrained
    monkeypatch.setattr(tokenizer_class, "save_pretrained",
                        lambda self, folder, **kwargs: calls.append(folder) or save(self, folder, **kwargs))
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2}))
    train.run(cfg, echo=lambda *_: None)
    out = Path(cfg.output_dir)
    saved = [c for c in calls if "checkpoint-" in str(c)]
    assert len(saved) == 1  # the first of three checkpoints; the run's own folder is saved as before
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        assert checkpoints.problem(folder) is None
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert filecmp.cmp(folder / name, out / name, shallow=False), (step, name)


@pytest.mark.slow
def test_a_checkpoint_is_sealed_while_the_next_steps_train(config_file, monkeypatch):
    """Hashing, fsync and the rename run beside training: checkpoint-2's seal holds until step 3 has trained,
    which a seal on the training thread would never see. Every checkpoint is in place when the run ends."""
    import threading

    from transformers import Trainer

    from roletune import train
    from roletune.config import load_config

    steps_while_sealing, sealed_by = threading.Event(), {}
    sealing = threading.Event()
    train_step, publish = Trainer.training_step, checkpoints.publish

    def training_step(self, *args, **kwargs):
        if sealing.is_set():
            steps_while_sealing.set()
        return train_step(self, *args, **kwargs)

    def slow_publish(staging, final):
        sealed_by[final.name] = threading.current_thread()
        if final.name == "checkpoint-2":
            sealing.set()
            sealed_by["stepped"] = steps_while_sealing.wait(timeout=30)
            sealing.clear()
        publish(staging, final)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    monkeypatch.setattr(checkpoints, "publish", slow_publish)
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2}))
    train.run(cfg, echo=lambda *_: None)

    assert sealed_by.pop("stepped") is True  # step 3 trained while checkpoint-2 was being sealed
    assert sorted(sealed_by) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert threading.main_thread() not in sealed_by.values()
    out = Path(cfg.output_dir)
    assert all(checkpoints.problem(out / name) is None for name in sealed_by)
    assert not (out / checkpoints.STAGING).exists() and checkpoints.Sealing.running == set()


def test_a_seal_that_fails_stops_the_run_naming_the_checkpoint(config_file, monkeypatch):
    from roletune import train
    from roletune.config import load_config

    publish = checkpoints.publish

    def full_disk(staging, final):
        if final.name == "checkpoint-4":
            raise OSError(28, "No space left on device")
        publish(staging, final)

    monkeypatch.setattr(checkpoints, "publish", full_disk)
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2}))
    with pytest.raises(RunError, match=r"^checkpoint-4 could not be saved: \[Errno 28\] No space left on device$"):
        train.run(cfg, echo=lambda *_: None)
    out = Path(cfg.output_dir)
    assert checkpoints.problem(out / "checkpoint-2") is None  # the good one before it is kept
    assert not (out / "checkpoint-4").exists() and not (out / "checkpoint-6").exists()
    assert not (out / "adapter_model.safetensors").exists()  # never saved as finished


def test_the_optimizer_state_a_seal_writes_is_the_one_at_its_step(config_file, monkeypatch):
    """AdamW's moments are copied on the training thread and written by the seal: checkpoint-2's optimizer.pt
    holds step 2's moments although, held here until step 3 has trained, the live ones have moved on."""
    import copy
    import threading

    import torch
    from transformers import TrainerCallback

    from roletune import train
    from roletune.config import load_config
    from roletune.training import stopping

    at_step_2, step_3_trained = {}, threading.Event()

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                at_step_2.update(copy.deepcopy(optimizer.state_dict()))
            if state.global_step == 3:
                step_3_trained.set()

    def hold(point, step):  # the seal's first moment, before it writes anything
        if (point, step) == ("write", 2):
            assert step_3_trained.wait(timeout=30)

    monkeypatch.setattr(stopping, "hold_for_tests", hold)
    writes, save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: writes.append(
        (threading.current_thread() is threading.main_thread(), Path(path).name)) or save(obj, path, *a, **k))
    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2}))
    train.run(cfg, callbacks=(Watch(),), echo=lambda *_: None)

    assert (False, "optimizer.pt") in writes and (True, "optimizer.pt") not in writes  # written by the seals
    saved = torch.load(Path(cfg.output_dir) / "checkpoint-2" / "optimizer.pt", weights_only=True)
    moments = [(i, key) for i, entry in at_step_2["state"].items() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and all(saved["state"][i][key].device.type == "cpu" for i, key in moments)
    assert all(torch.equal(saved["state"][i][key], at_step_2["state"][i][key]) for i, key in moments)
    assert saved["param_groups"] == at_step_2["param_groups"]
    assert checkpoints.problem(Path(cfg.output_dir) / "checkpoint-2") is None
