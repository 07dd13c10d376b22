"""Crash-safe checkpoints: a checkpoint-N folder appears only when complete, sealed by a manifest
that `--resume` verifies, so a run killed at any moment resumes from its newest good checkpoint.

Trainer writes checkpoint-N in place. AtomicCheckpoints redirects that write into
output_dir/.partial/checkpoint-N, adds roletune_checkpoint.json (every file's size and sha256)
last, and renames the finished folder into place in one step. A save killed half-way stays under
.partial, which nothing reads and the next save clears.

Sealing (each file's fsync and sha256, the manifest, the rename, rotating old checkpoints) runs on a
thread of its own while training goes on: for Qwen2.5-7B's adapter and its AdamW moments (249 MiB a
checkpoint) it took about 0.4 s of the 0.7-0.8 s a checkpoint cost the training thread on the 2-core CPU,
seven times a run of the huanhuan recipe (benchmarks/checkpoint_time.py). Hashing and fsync release the
GIL; on a GPU machine the training thread launches kernels from one core and the seal takes another (a CPU
run whose steps use every core shares them with it). Trainer writes the files first, on the training
thread, from the live weights, but for the optimizer's state: that is copied there and written by the seal
(_save_optimizer_and_scheduler). The next checkpoint, and the end of train(), wait for the seal, and a seal
that failed is raised there, naming its checkpoint. So a callback's on_save may come before the folder is
in place.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import torch
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

from roletune import run_dir
from roletune.errors import RunError

log = logging.getLogger(__name__)

STAGING = ".partial"
TRAINING_ARGS_JSON = "training_args.json"  # in place of Trainer's pickled training_args.bin
MANIFEST = "roletune_checkpoint.json"
HASH_LIMIT = 1 << 30  # larger files are checked by size only, so verifying stays quick
_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def find_checkpoint(output_dir: str, resume: str) -> str | None:
    """The checkpoint `--resume` continues from.

    `latest`: the newest checkpoint-N whose manifest verifies; newer incomplete or corrupt ones are
    skipped with a warning. None when output_dir holds only what a run writes before its first
    checkpoint (it was stopped before one): training starts over. Anything else must be a checkpoint
    folder, and one with a manifest must verify.
    """
    if resume == "latest":
        found, skipped = newest_good(output_dir)
        if found is None and skipped:
            raise RunError(f"{output_dir}: no complete checkpoint to resume from: {'; '.join(skipped)}; "
                           "pass --resume CHECKPOINT to use one anyway")
        if skipped:
            log.warning("%s: skipped %s; resuming from %s", output_dir, "; ".join(skipped), found.name)
        if found is None and Path(output_dir).is_dir() and _only_startup_files(output_dir):
            log.warning("%s: stopped before its first checkpoint; starting again from step 0", output_dir)
            return None
        if found is None:
            raise RunError(f"{output_dir}: no checkpoint-N folder to resume from")
        return str(found)
    if not (Path(resume) / "trainer_state.json").is_file():
        raise RunError(f"{resume}: not a training checkpoint (no trainer_state.json)")
    if not has_manifest(resume):
        log.warning("%s: no %s, so it cannot be verified; resuming from it as asked", resume, MANIFEST)
    elif why := problem(resume):
        raise RunError(f"{resume}: incomplete or corrupt checkpoint ({why})")
    return resume


def _only_startup_files(output_dir: str) -> bool:
    """True when output_dir holds nothing a run writes after it starts training steps."""
    startup = {run_dir.CONFIG_NAME, run_dir.HELDOUT_NAME, "samples.jsonl", "swanlog", "tensorboard", STAGING}
    return all(child.name in startup for child in Path(output_dir).iterdir())


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written aside, sealed with its manifest, then renamed into place."""

    _staging_root: str | None = None
    _sealing = None  # Sealing of the newest checkpoint, until waited for
    _deferred: list | None = None  # (path, state) the seal writes first, for the checkpoint being written
    _tokenizer_files = None  # TokenizerFiles of processing_class, once a save has written it
    _newest_sealed: Path | None = None  # the newest checkpoint folder in place, set by its seal
    checkpoint_extras = None  # folder -> None: files of roletune's own, written before the manifest seals it
    hold_for_tests = staticmethod(lambda point, step: None)  # stopping.hold_for_tests, handed in by RoleTrainer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Trainer writes the tokenizer into every checkpoint: serialised once, its files written again after,
        # each a hard link to the newest sealed checkpoint's copy where one is there (a checkpoint's files
        # never change once sealed, and a link keeps a copy alive when rotation deletes the other).
        tokenizer = self.processing_class
        if tokenizer is not None:
            if self._tokenizer_files is None or self._tokenizer_files.tokenizer is not tokenizer:
                self._tokenizer_files = TokenizerFiles(tokenizer)
            self._tokenizer_files.link_from = self._newest_sealed if self._staging_root else None
            self.processing_class = self._tokenizer_files
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.processing_class = tokenizer
        folder = Path(output_dir or self.args.output_dir)
        pickled = folder / TRAINING_ARGS_NAME
        if self.args.should_save and pickled.is_file():
            # Trainer pickles its arguments, and unpickling a file can run code: JSON reads without that risk.
            (folder / TRAINING_ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
            pickled.unlink()

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        if trial is not None:  # hyperparameter search keeps Trainer's own layout
            return super()._save_checkpoint(model, trial)
        step, hold_for_tests = self.state.global_step, self.hold_for_tests
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        root = Path(self.args.output_dir)
        staging = root / STAGING
        self.wait_for_checkpoints()  # the previous one is sealed and out of .partial
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a save killed half-way left behind
        self.accelerator.wait_for_everyone()
        self._staging_root, self._deferred = str(staging), []
        try:
            super()._save_checkpoint(model, trial)
            deferred = self._deferred
        finally:
            self._staging_root, self._deferred = None, None
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_K.pth) are in
        if self.args.should_save:
            if self.checkpoint_extras is not None:
                self.checkpoint_extras(staging / name)
            limit, best = self.args.save_total_limit, self.state.best_model_checkpoint

            def seal():
                hold_for_tests("write", step)  # written aside, not yet sealed
                for path, state in deferred:
                    torch.save(state, path)
                publish(staging / name, root / name)
                self._newest_sealed = root / name  # read by the training thread only after waiting for this
                shutil.rmtree(staging, ignore_errors=True)
                # Rotation only after the new checkpoint is in place: an older good one is never deleted first.
                rotate_checkpoints(output_dir=str(root), save_total_limit=limit, best_model_checkpoint=best,
                                   use_mtime=True)

            self._sealing = Sealing(name, seal)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's save of the optimizer, with AdamW's moments (twice the adapter: 160 MB for the recipe's 7B
        one) copied aside on the training thread and written by the seal. torch.save took about 0.2 s of a
        checkpoint's time on the training thread on the 2-core CPU; the copy a fraction of that. The file is
        Trainer's (its tensors on the CPU, which loading maps to the model's device). TPU, SageMaker,
        DeepSpeed and FSDP save their own way, as Trainer does, and so does a save outside _save_checkpoint."""
        if self._deferred is None or is_torch_xla_available() or is_sagemaker_mp_enabled() or \
                self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        self._deferred.append((os.path.join(output_dir, OPTIMIZER_NAME), _detached_copy(self.optimizer.state_dict())))
        with warnings.catch_warnings(record=True) as caught_warnings:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        reissue_pt_warnings(caught_warnings)

    def wait_for_checkpoints(self) -> None:
        """Return once the checkpoint being sealed, if any, is in place; raise RunError if its seal failed."""
        sealing, self._sealing = self._sealing, None
        if sealing is not None:
            sealing.wait()

    def train(self, *args, **kwargs):
        try:
            result = super().train(*args, **kwargs)
        except BaseException:
            if self._sealing is not None:  # a complete checkpoint is still worth sealing; this error comes first
                self._sealing.wait(quiet=True)
            raise
        self.wait_for_checkpoints()
        return result


class Sealing:
    """One checkpoint's seal, running on a thread of its own from construction until `wait`."""

    running: set = set()  # the threads sealing now, in this process (test holds wait for them)

    def __init__(self, name: str, seal):
        self.name, self.error = name, None
        self.thread = threading.Thread(target=self._run, args=(seal,), name=f"roletune-seal-{name}")
        Sealing.running.add(self.thread)
        self.thread.start()

    def _run(self, seal) -> None:
        try:
            seal()
        except BaseException as error:  # raised again on the training thread, by wait()
            self.error = error
        finally:
            Sealing.running.discard(self.thread)

    def wait(self, quiet: bool = False) -> None:
        """Join the seal; a failed one raises RunError, or with `quiet` (another error is on its way) logs it."""
        self.thread.join()
        if self.error is None:
            return
        if quiet:
            log.error("%s could not be saved: %s", self.name, self.error)
        else:
            raise RunError(f"{self.name} could not be saved: {self.error}") from self.error


def _detached_copy(state):
    """`state` (dicts, lists, tensors) with every tensor copied into CPU memory, which training goes on
    without: AdamW updates its moments in place."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _detached_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_detached_copy(value) for value in state)
    return state


def wait_for_seals() -> None:
    """Wait for every checkpoint being sealed in this process, where what is on disk must not depend on thread
    timing: the NaN stop naming the last good checkpoint, and test holds."""
    for thread in list(Sealing.running):
        if thread is not threading.current_thread():
            thread.join()


class TokenizerFiles:
    """Stands in for a tokenizer whose save_pretrained Trainer calls for each checkpoint: the first call
    saves it, later ones write the same files' bytes again.

    Serialising Qwen2.5's tokenizer (a 7 MB tokenizer.json of 151k tokens and their merges) took 0.16 s a
    checkpoint on the 2-core CPU, most of a small adapter's checkpoint, for files that do not change while
    training. A save_pretrained that does not list what it wrote is called every time, as before.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.files = tokenizer, None
        self.link_from: Path | None = None  # a folder holding the same files, to hard-link instead of copying

    def save_pretrained(self, folder, **kwargs):
        folder = Path(folder)
        if self.files is not None and not kwargs:
            for name, data in self.files.items():
                if not self._linked(folder / name, data):
                    (folder / name).write_bytes(data)
            return tuple(str(folder / name) for name in self.files)
        written = self.tokenizer.save_pretrained(folder, **kwargs)
        paths = [Path(path) for path in written] if isinstance(written, (list, tuple)) else []
        if not kwargs and paths and all(path.parent == folder and path.is_file() for path in paths):
            self.files = {path.name: path.read_bytes() for path in paths}
        return written

    def _linked(self, target: Path, data: bytes) -> bool:
        source = self.link_from / target.name if self.link_from is not None else None
        try:
            if source is None or source.stat().st_size != len(data) or source.read_bytes() != data:
                return False
            os.link(source, target)
            return True
        except OSError:  # gone with rotation, or a file system without hard links: a copy, as before
            return False


@functools.cache
def publish(staging: Path, final: Path) -> None:
    """Seal `staging` with its manifest and move it to `final` with one rename."""
    run_dir.open_as_umask(staging, recursive=True)
    write_manifest(staging)
    if final.exists():  # the same step saved again, e.g. by a run resumed from an earlier checkpoint
        replaced = staging.parent / f"replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync(final.parent)


def write_manifest(folder: Path) -> None:
    """List every file with its size and sha256; written last, so its presence means 'complete'."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)  # the data is on disk before the manifest vouches for it
        files[path.relative_to(folder).as_posix()] = _describe(path)
    target = folder / MANIFEST
    with open(target, "w", encoding="utf-8") as out:
        json.dump({"format": 1, "files": files}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    _fsync(folder)


def problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete, intact checkpoint, or None when its manifest verifies."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST}: the save never finished"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size} bytes, the manifest says {expected['size']}"
            if "sha256" in expected and _sha256(path) != expected["sha256"]:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    return None


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def newest_good(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint-N in output_dir whose manifest verifies, and why each newer one was passed over."""
    skipped = []
    for folder in sorted(_checkpoints(output_dir), key=step_of, reverse=True):
        why = problem(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name} ({why})")
    return None, skipped


def step_of(checkpoint: str | Path) -> int:
    match = _NAME.match(Path(checkpoint).name)
    return int(match[1]) if match else 0


def _checkpoints(output_dir: str | Path) -> list[Path]:
    path = Path(output_dir)
    return [p for p in path.iterdir() if p.is_dir() and _NAME.match(p.name)] if path.is_dir() else []


def _describe(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, "sha256": _sha256(path)} if size <= HASH_LIMIT else {"size": size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a kill -9 needs no fsync; a power cut does)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)
