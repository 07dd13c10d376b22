"""`roletune serve --engine vllm`: the same runs behind vLLM's own OpenAI-compatible server, for GPU
machines and many users. roletune only builds vLLM's command line and hands the process over to it.

vLLM serves the base under its own name and each run's adapter as a LoRA module (`--lora-modules
NAME=PATH`), with the runs' chat template. It has no system prompt per adapter: clients send the persona
as the first message (docs/serve.md shows how), where roletune's own engine adds it for them.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from roletune.errors import RunError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def vllm_command(runs: list[tuple[str | None, str]], *, base_model: str | None = None, host: str = "127.0.0.1",
                 port: int = 8000, dtype: str | None = None, quantization: str | None = None) -> list[str]:
    """The `vllm serve` command line for `runs` (as serve.parse_runs gives them). An API key goes to vLLM
    in its environment (run_vllm), not on a command line that any user of the machine can read."""
    import dataclasses

    from roletune.model import load_tokenizer
    from roletune.serve.engine import base_id, open_runs

    opened = open_runs(runs, base_model)
    first = opened[0][2]
    command = ["vllm", "serve", first.base, "--served-model-name", base_id(first.base), "--host", host,
               "--port", str(port)]
    dtype = dtype or first.model_cfg.dtype
    if dtype:
        command += ["--dtype", DTYPES[dtype]]
    quantization = quantization or first.model_cfg.quantization
    if quantization == "8bit":
        raise RunError("--engine vllm quantizes to 4 bits (bitsandbytes) only; pass --quantization 4bit or none")
    if quantization == "4bit":
        command += ["--quantization", "bitsandbytes"]
    adapted = [(name, run) for name, _, run in opened if run.adapter]
    if adapted:
        rank = max(_rank(run.adapter) for _, run in adapted)
        fits = [r for r in LORA_RANKS if r >= rank]
        if not fits:
            raise RunError(f"LoRA rank {rank} is above the largest vLLM serves ({LORA_RANKS[-1]}); "
                           "serve with --engine roletune")
        command += ["--enable-lora", "--max-loras", str(len(adapted)), "--max-lora-rank", str(fits[0]),
                    "--lora-modules", *(f"{name}={Path(run.adapter).resolve()}" for name, run in adapted)]
    templates = {}
    for name, location, run in opened:
        tokenizer = load_tokenizer(dataclasses.replace(run.model_cfg, tokenizer=run.tokenizer))
        templates.setdefault(tokenizer.chat_template, name)
    if len(templates) > 1:
        raise RunError(f"{' and '.join(templates.values())} were trained with different chat templates and vLLM "
                       "takes one for all; serve them apart, or with --engine roletune")
    (template,) = templates
    if template:
        command += ["--chat-template", template]  # vLLM takes the template itself as well as a file
    return command


def run_vllm(command: list[str], api_key: str | None = None, echo=print) -> None:
    """Replace this process with vLLM's server (its signals, logs and exit code are vLLM's own)."""
    shown = shlex.join(arg if "\n" not in arg else "CHAT_TEMPLATE" for arg in command)
    if shutil.which(command[0]) is None:
        raise RunError(f"vLLM is not installed here (no `{command[0]}` on PATH): pip install vllm on a machine with "
                       f"an NVIDIA GPU; the command would be: {shown}")
    echo(f"starting vLLM: {shown}")
    os.execvpe(command[0], command, {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})})


def _rank(adapter: str) -> int:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([config.get("r") or 8, *(config.get("rank_pattern") or {}).values()])
