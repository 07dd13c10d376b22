"""`roletune export --adapter-only`: the LoRA alone as a GGUF (llama.cpp's convert_lora_to_gguf.py), which
llama.cpp applies to the base's GGUF at load time (`--lora`, Ollama's ADAPTER): one base file, many
characters, each a few MiB.

An adapter GGUF carries no chat template and no persona: the Modelfile gives Ollama both, and llama.cpp's
own tools take the persona as a system message. With --base-gguf, llama.cpp's runtime answers the run's
prompts with the adapter on that base, and the replies are compared with the run's own in transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

from roletune.errors import RunError

ADAPTER_QUANTS = ("f16", "bf16", "q8_0")  # what llama.cpp's LoRA converter writes


def check_request(location: str, run, to: str, quant: str, base_gguf: str | None) -> None:
    """What --adapter-only cannot do, refused before anything runs."""
    if not run.adapter:
        raise RunError(f"{location}: --adapter-only exports a run's adapter, and this is a whole model")
    if quant not in ADAPTER_QUANTS:
        raise RunError(f"{quant}: an adapter is written as {', '.join(ADAPTER_QUANTS)} (k-quants are for whole "
                       "models)")
    if base_gguf and not Path(base_gguf).is_file():
        raise RunError(f"{base_gguf}: no such file (--base-gguf names the base model's GGUF)")
    if to == "ollama" and not base_gguf:
        raise RunError("--adapter-only --to ollama needs --base-gguf FILE, the base model as a GGUF for the "
                       "Modelfile's FROM (roletune export BASE_FOLDER --out DIR writes one)")


def write_adapter(location: str, run, work: Path, name: str, quant: str, config, converter: Path, *,
                  base_gguf: str | None, base_model: str | None, check: str, device: str, to: str,
                  echo) -> tuple[Path, dict]:
    from roletune.export import llama_cpp
    from roletune.export.check import adapter_metadata
    from roletune.export.ollama import write_modelfile

    shape = work / "base-config"  # the converter reads the base's shape from its config.json alone
    config.save_pretrained(shape)
    gguf = work / f"{name}-lora-{quant}.gguf"
    echo(f"converting the adapter with llama.cpp's LoRA converter (llama-cpp-python {llama_cpp.version()}) to {quant}")
    llama_cpp.convert_lora(Path(run.adapter), shape, gguf, quant, converter)
    alpha = float(json.loads((Path(run.adapter) / "adapter_config.json").read_text(encoding="utf-8"))["lora_alpha"])
    checks = {"adapter": adapter_metadata(gguf, alpha)}
    if check != "none" and base_gguf:
        checks["replies"] = _replies(location, gguf, Path(base_gguf), base_model, device, run.system_prompt, echo)
    elif check != "none":
        echo("reply check skipped: --base-gguf FILE (the base model as a GGUF) lets llama.cpp answer with the adapter")
    if to == "ollama":
        write_modelfile(work, run.tokenizer, run.base, run.system_prompt, str(Path(base_gguf).resolve()),
                        f"./{gguf.name}", echo)
    (shape / "config.json").unlink()
    shape.rmdir()
    return gguf, checks


def _replies(location: str, gguf: Path, base_gguf: Path, base_model: str | None, device: str,
             system: str | None, echo) -> dict:
    """llama.cpp's replies with the adapter on the base GGUF, against the run's own (adapter unmerged). The
    base's template carries no persona, so the run's system prompt is sent as a system message, as Ollama's
    SYSTEM and `roletune chat` send it."""
    from roletune import decoding
    from roletune.export.check import replies, reply_prompts

    session = decoding.load_session(location, device=device, base_model=base_model)
    conversations = [decoding.with_system([{"role": "user", "content": p}], system) for p in reply_prompts(location)]
    return replies(session.model, session.tokenizer, base_gguf, conversations, lora=gguf, echo=echo)
