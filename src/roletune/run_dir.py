"""What a run folder holds, and the rules for reusing one.

output_dir/
  adapter_model.safetensors, adapter_config.json   the trained LoRA adapter (peft)
  tokenizer files + chat_template.jinja            the exact tokenizer and template used
  roletune.yaml                                    the resolved config (system prompt included)
  heldout.jsonl                                    rows held out by data.eval_size, as messages
  samples.jsonl, train_summary.json, loss.png      sample answers per epoch, the summary, the curves
  trainer_state.json                               the Trainer's log history (losses per step)
  checkpoint-N/                                    resumable Trainer checkpoints, each with roletune.yaml and
                                                   roletune_checkpoint.json (the manifest --resume verifies)
  .partial/                                        a checkpoint being written; renamed to checkpoint-N when complete
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from roletune.config import Config, ModelConfig, config_from_dict, dump_config
from roletune.errors import RunError

log = logging.getLogger(__name__)

CONFIG_NAME = "roletune.yaml"
ADAPTER_NAME = "adapter_model.safetensors"
HELDOUT_NAME = "heldout.jsonl"
SUMMARY_NAME = "train_summary.json"
MERGE_RECORD = "roletune_merge.json"  # how a merged model was made, and its system prompt


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


def clear(output_dir: str) -> None:
    """Empty output_dir for --overwrite, once everything else has been checked."""
    path = Path(output_dir)
    if path.is_dir():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def write_config(folder: str | Path, cfg: Config) -> Path:
    target = Path(folder) / CONFIG_NAME
    write_aside(target, dump_config(cfg))
    return target


def write_heldout(folder: str | Path, conversations: list) -> Path:
    target = Path(folder) / HELDOUT_NAME
    lines = [json.dumps({"messages": [m.as_dict() for m in c]}, ensure_ascii=False) + "\n" for c in conversations]
    write_aside(target, "".join(lines))
    return target


def read_heldout(run: str | Path) -> list:
    """The held-out conversations training saved, or RunError when it held none out."""
    from roletune.data import Message

    path = Path(run) / HELDOUT_NAME
    if not path.is_file():
        raise RunError(f"{run}: the run has no held-out split (train with data.eval_size); pass --data FILE")
    return [[Message(**m) for m in json.loads(line)["messages"]]
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_aside(target: Path, text: str) -> None:
    """Write next to the target and rename: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    open_as_umask(Path(tmp.name))
    os.replace(tmp.name, target)


def open_as_umask(path: Path, recursive: bool = False) -> None:
    """Give `path` (and with `recursive`, all within it) the permissions a plain new file or folder gets
    under this process's umask. Temporary files and folders, which roletune writes aside and renames,
    and safetensors' own writes are created 0600 / 0700: readable by no one else sharing the run."""
    paths = [path, *(path.rglob("*") if recursive and path.is_dir() else ())]
    for item in paths:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~_UMASK)


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def read_config(run: str | Path) -> Config:
    import yaml

    path = Path(run) / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run}: not a roletune run (no {CONFIG_NAME})")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))


def reply_cap(location: str, default: int) -> int:
    """The run's eval.max_new_tokens, the cap its sample answers used; `default` for an adapter folder or model."""
    if not (Path(location) / CONFIG_NAME).is_file():
        return default
    return read_config(location).eval.max_new_tokens


@dataclass
class Run:
    """What inference needs from a run folder, an adapter folder, or a plain model."""
    base: str                  # base model location (folder, hub id, modelscope:ID)
    adapter: str | None        # adapter folder, None for a plain model
    tokenizer: str             # where the tokenizer (and its chat template) is read from
    system_prompt: str | None  # the one training used, reused unless overridden
    model_cfg: ModelConfig     # dtype, attention kernel, trust_remote_code as in training


def open_run(location: str, base_model: str | None = None) -> Run:
    """A roletune run (or one of its checkpoints), a peft adapter folder, or a plain model. `base_model`:
    another copy of the base the adapter was trained on (a folder or hub id), in place of the recorded one."""
    path = Path(location)
    adapter_folder = (path / "adapter_config.json").is_file()
    if base_model is not None and not adapter_folder:
        raise RunError(f"{location}: --base-model goes with a run or adapter folder; this is a whole model")
    if (path / CONFIG_NAME).is_file() and adapter_folder:
        cfg = read_config(path)
        base = base_model or _recorded_base(location, cfg.model.path, f"model.path in its {CONFIG_NAME}")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else cfg.model.tokenizer or base
        return Run(base, str(path), tokenizer, cfg.data.system_prompt, dataclasses.replace(cfg.model, path=base))
    if adapter_folder:
        try:
            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise RunError(f"{location}: adapter_config.json has no base_model_name_or_path") from None
        base = base_model or _recorded_base(location, base, "base_model_name_or_path in its adapter_config.json")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else base
        return Run(base, str(path), tokenizer, None, ModelConfig(path=base))
    if (path / "config.json").is_file() or (not path.exists() and looks_like_hub_id(location)):
        record = path / MERGE_RECORD
        system = json.loads(record.read_text(encoding="utf-8")).get("system_prompt") if record.is_file() else None
        return Run(location, None, location, system, ModelConfig(path=location))
    raise RunError(f"{location}: not a roletune run, an adapter folder or a model "
                   f"(no {CONFIG_NAME}, adapter_config.json or config.json)")


def _recorded_base(location: str, base: str, where: str) -> str:
    """The base a run records, or a RunError when it is a folder that is not here (a run copied from another
    machine, or one recorded relative to the folder it was trained from)."""
    if not Path(base).expanduser().exists() and not looks_like_hub_id(base):
        raise RunError(f"{location}: its base model {base} ({where}) is not here: no such folder; "
                       "pass --base-model PATH_OR_ID to use another copy of it")
    return base


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with each local file or folder it reads (model.path, model.tokenizer, data.path) absolute, so
    that the roletune.yaml a run saves works from any folder; hub ids, URLs and modelscope: ids stay as given."""
    def absolute(location: str | None) -> str | None:
        if not location or "://" in location or not Path(location).expanduser().exists():
            return location
        return os.path.abspath(Path(location).expanduser())  # symbolic links kept, as the user named them

    model = dataclasses.replace(cfg.model, path=absolute(cfg.model.path), tokenizer=absolute(cfg.model.tokenizer))
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)))


def looks_like_hub_id(location: str) -> bool:
    """NAME, OWNER/NAME or modelscope:OWNER/NAME, as a base model or run is named when it is not a folder."""
    if location.startswith("modelscope:"):
        return True
    return location.count("/") <= 1 and not location.startswith((".", "/", "~")) and "\\" not in location
