"""`roletune export`: a run as one GGUF file for llama.cpp, LM Studio and the like, or for Ollama with a
Modelfile that carries the run's template, persona and stop token.

The adapter is merged as `roletune merge` does (its logit check included), in the base's own dtype, so
that the only rounding is the format's; then it is converted by llama.cpp's own converter, and for
k-quants quantized by llama.cpp's own quantizer (llama_cpp.py), and checked before the export is called
done (check.py): the GGUF carries the run's chat template, persona first, and llama.cpp's runtime gives
the merged model's greedy replies, each ending at the template's end of turn. Everything is written in a
hidden folder beside --out and renamed at the end, so an interrupted export leaves nothing half-written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from roletune import __version__
from roletune.errors import RunError
from roletune.run_dir import open_run

BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0,
                    "q8_0": 34 / 32,  # 32 one-byte weights and an f16 scale
                    "q6_k": 0.83, "q5_k_m": 0.72, "q4_k_m": 0.62}  # llama.cpp's bits per weight on 7B, over 8
MERGE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # config.json's dtype -> merge's
LOGIT_CHECK_LIMIT = 2e9  # parameters: above it, loading the GGUF and the merged model in fp32 is opt-in


def export(location: str, out: str, *, to: str = "gguf", quant: str = "q8_0", base_model: str | None = None,
           device: str = "auto", check: str = "auto", echo=print) -> Path:
    from roletune.export import llama_cpp
    from roletune.merge import merge

    target = Path(out)
    if quant not in llama_cpp.QUANTS:
        raise RunError(f"{quant}: not a quantization export writes ({', '.join(llama_cpp.QUANTS)})")
    if target.exists():
        raise RunError(f"{out}: exists; choose a new --out (nothing was written)")
    run = open_run(location, base_model)
    if not run.adapter and not Path(run.base).is_dir():
        raise RunError(f"{location}: a whole model is exported from a local folder; download it first")
    kquant = quant in llama_cpp.KQUANTS
    llama_cpp.check_tools(runtime=kquant or check != "none")
    converter = llama_cpp.converter_folder()
    config, parameters = _shape(run.base)
    architecture = (config.architectures or ["?"])[0]
    if not llama_cpp.supported(architecture, converter):
        raise RunError(f"{architecture}: llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) cannot "
                       "convert this architecture")
    dtype = MERGE_DTYPES.get(str(getattr(config, "dtype", None) or "").replace("torch.", ""), "bf16")
    _check_disk(target.parent, parameters, quant, merged_bytes=BYTES_PER_WEIGHT[dtype] * (bool(run.adapter) + kquant))

    work = target.parent / f".{target.name}.partial"
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted export of the same --out left
    work.mkdir(parents=True)
    try:
        if run.adapter:
            merged = work / "merged"
            merge(location, str(merged), dtype=dtype, device=device, base_model=base_model,
                  echo=lambda line: None if line.startswith("merged model:") else echo(line))  # not where it stays
        else:
            merged = Path(run.base)
        name = Path(location).resolve().name
        gguf = work / f"{name}-{quant}.gguf"
        if kquant:  # the quantizer starts from a file in the merged weights' own dtype
            whole = work / f"{name}-{dtype}.gguf"
            echo(f"converting with llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) to {dtype}")
            llama_cpp.convert(merged, whole, dtype, converter)
            echo(f"quantizing with llama.cpp's quantizer to {quant}")
            llama_cpp.quantize(whole, gguf, quant)
            whole.unlink()
        else:
            echo(f"converting with llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) to {quant}")
            llama_cpp.convert(merged, gguf, quant, converter)
        checks = _check(merged, gguf, quant, parameters, check, device, _reply_prompts(location), echo)
        if to == "ollama":
            _write_modelfile(work, merged, gguf.name, echo)
        record = {"run": str(Path(location).resolve()), "base": run.base, "to": to, "quant": quant,
                  "llama_cpp_python": llama_cpp.version(), "checks": checks, "roletune": __version__}
        (work / "roletune_export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        if run.adapter:
            shutil.rmtree(merged)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    written = target / gguf.name
    echo(f"{written}: {written.stat().st_size / 2**20:.1f} MiB")
    if to == "ollama":
        echo(f"ollama create {name} -f {target / 'Modelfile'}")
    return written


def _shape(base: str):
    """The base's config and parameter count, from its config alone (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, sum(p.numel() for p in model.parameters())


def _check_disk(folder: Path, parameters: int, quant: str, merged_bytes: float) -> None:
    """The merged weights and the GGUF lie side by side before the merged ones are removed."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    needed = parameters * (BYTES_PER_WEIGHT[quant] + merged_bytes) * 1.05
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise RunError(f"{existing}: {free / 2**30:.1f} GiB free, and the export needs about {needed / 2**30:.1f} GiB "
                       "(merged weights and the GGUF side by side); free some space or choose another --out")


def _reply_prompts(location: str) -> list[str]:
    """The prompts a run's sample answers were written for (eval.sample_prompts), else merge's probes."""
    from roletune.merge import PROBES
    from roletune.run_dir import CONFIG_NAME, read_config

    if (Path(location) / CONFIG_NAME).is_file():
        return list(read_config(Path(location)).eval.sample_prompts or PROBES)
    return PROBES


def _check(merged: Path, gguf: Path, quant: str, parameters: int, check: str, device: str, prompts: list[str],
           echo) -> dict:
    from transformers import AutoTokenizer

    from roletune.model import resolve_device
    from roletune.export.check import chat_template, logits, replies
    from roletune.merge import PROBES

    want = AutoTokenizer.from_pretrained(merged).chat_template
    if chat_template(gguf) != want:
        raise RunError("GGUF check failed: the file does not carry the merged model's chat template; nothing was "
                       "written")
    checks = {"chat_template": "the merged model's, persona first"}
    if check != "none":
        checks["replies"] = replies(merged, gguf, prompts, device=resolve_device(device), echo=echo)
    if check == "logits" or (check == "auto" and parameters <= LOGIT_CHECK_LIMIT):
        checks["logits"] = logits(merged, gguf, quant, PROBES, echo)
    elif check == "auto":
        echo(f"logit check skipped ({parameters / 1e9:.1f}B parameters); --check logits runs it")
    return checks


def _write_modelfile(work: Path, merged: Path, gguf_name: str, echo) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from roletune.export.ollama import is_chatml, modelfile

    tokenizer = AutoTokenizer.from_pretrained(merged)
    record = merged / "roletune_merge.json"
    system = json.loads(record.read_text(encoding="utf-8")).get("system_prompt") if record.is_file() else None
    if system and '"""' in system:
        raise RunError('the system prompt holds """, which a Modelfile cannot quote; nothing was written')
    chatml = is_chatml(tokenizer)
    if not chatml:
        echo("the chat template is not ChatML: the Modelfile leaves TEMPLATE to the one the GGUF carries")
    try:
        generation = GenerationConfig.from_pretrained(merged).to_dict()
    except OSError:
        generation = {}
    stops = ["<|im_end|>"] if chatml else [tokenizer.eos_token]
    (work / "Modelfile").write_text(modelfile(gguf_name, system=system, chatml=chatml, stops=stops,
                                              generation=generation), encoding="utf-8")
