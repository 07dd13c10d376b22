"""What a run folder holds, and the rules for reusing one.

output_dir/
  adapter_model.safetensors, adapter_config.json   the trained LoRA adapter (peft)
  tokenizer files + chat_template.jinja            the exact tokenizer and template used
  roletune.yaml                                    the resolved config (system prompt included)
  checkpoint-N/                                    resumable Trainer checkpoints, each with roletune.yaml
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from roletune.config import Config, config_from_dict, dump_config
from roletune.errors import RunError

CONFIG_NAME = "roletune.yaml"
ADAPTER_NAME = "adapter_model.safetensors"


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to clobber an earlier run; refuse to resume nothing. Writes nothing."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RunError(f"{output_dir}: output_dir exists and is not a folder")
    not_empty = path.is_dir() and any(path.iterdir())
    if resume is not None:
        if resume == "latest" and not not_empty:
            raise RunError(f"{output_dir}: nothing to resume (the folder is empty or missing)")
    elif not_empty and not overwrite:
        raise RunError(f"{output_dir}: output_dir is not empty (an earlier run?); "
                       "pass --resume to continue it or --overwrite to replace it")


def find_checkpoint(output_dir: str, resume: str) -> str:
    """`latest` -> the newest checkpoint-N in output_dir; anything else must be a checkpoint folder."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "latest":
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise RunError(f"{output_dir}: no checkpoint-N folder to resume from")
        return found
    if not (Path(resume) / "trainer_state.json").is_file():
        raise RunError(f"{resume}: not a training checkpoint (no trainer_state.json)")
    return resume


def clear(output_dir: str) -> None:
    """Empty output_dir for --overwrite, once everything else has been checked."""
    path = Path(output_dir)
    if path.is_dir():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def write_config(folder: str | Path, cfg: Config) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CONFIG_NAME
    # Write aside and rename: a reader never sees half a config.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".tmp") as tmp:
        tmp.write(dump_config(cfg))
    os.replace(tmp.name, target)
    return target


def read_config(run: str | Path) -> Config:
    import yaml

    path = Path(run) / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run}: not a roletune run (no {CONFIG_NAME})")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))
