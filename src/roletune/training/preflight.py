"""Checks made before any heavy work (loading the model): the run folder can be written, and the
disk has room for the checkpoints the run will write. Each failure is one RunError line. (The data
has already been read and validated end to end by train.build_dataset.)"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from roletune.config import Config
from roletune.errors import RunError
from roletune.training.checkpoints import step_of

# Tokenizer files, trainer_state.json, RNG and scheduler state beside each saved adapter (Qwen2.5's
# tokenizer files are about 11 MB): a generous allowance.
EXTRA_BYTES_PER_SAVE = 32 * 2**20
ADAPTER_FILE_BYTES = 4  # peft keeps LoRA weights in fp32
OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments per trainable parameter


def check(cfg: Config, examples: int, resume_from: str | None = None) -> None:
    """Writable output folder and enough free disk; `resume_from` is the checkpoint training continues from."""
    where = existing_parent(cfg.output_dir)
    check_writable(cfg.output_dir, where)
    start = step_of(resume_from) if resume_from else 0
    needed, detail = disk_needed(cfg, trainable_parameters(cfg), planned_steps(cfg, examples) - start)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise RunError(f"{cfg.output_dir}: not enough free disk in {where}: about {_size(needed)} needed "
                       f"({detail}), {_size(free)} free; free some space, raise train.save_steps or set "
                       "train.save_total_limit")


def existing_parent(folder: str) -> Path:
    path = Path(os.path.abspath(folder))
    while not path.exists():
        path = path.parent
    return path


def check_writable(output_dir: str, where: Path) -> None:
    if not where.is_dir():
        raise RunError(f"{output_dir}: {where} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise RunError(f"{output_dir}: cannot write in {where} ({exc.strerror or exc})") from None


def trainable_parameters(cfg: Config) -> int:
    """LoRA's parameter count, from the model's architecture on the meta device (no weights read)."""
    from roletune.model import apply_lora, build_meta_model

    return apply_lora(build_meta_model(cfg.model), cfg.lora).get_nb_trainable_parameters()[0]


def planned_steps(cfg: Config, examples: int) -> int:
    """Optimizer steps on one process (an upper bound when several share the work)."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    return math.ceil(t.epochs * math.ceil(math.ceil(examples / t.batch_size) / t.grad_accum))


def disk_needed(cfg: Config, trainable: int, steps: int) -> tuple[int, str]:
    """Bytes the run will hold at its peak, and how that figure was made."""
    saves = math.ceil(max(steps, 0) / cfg.train.save_steps)  # Trainer also saves at the last step
    limit = cfg.train.save_total_limit
    # With a limit, a new checkpoint is complete before the oldest is rotated out: limit + 1 at the peak.
    at_once = min(saves, limit + 1) if limit else saves
    checkpoint = trainable * (ADAPTER_FILE_BYTES + OPTIMIZER_BYTES) + EXTRA_BYTES_PER_SAVE
    adapter = trainable * ADAPTER_FILE_BYTES + EXTRA_BYTES_PER_SAVE
    detail = f"{at_once} checkpoints of {_size(checkpoint)} and the adapter"
    return at_once * checkpoint + adapter, detail


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} TiB"
