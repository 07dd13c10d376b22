"""`roletune export`: a run as one GGUF file for llama.cpp, LM Studio and the like, or for Ollama with a
Modelfile that carries the run's template, persona and stop token.

The adapter is merged as `roletune merge` does (its logit check included), in the base's own dtype, so
that the only rounding is the format's; then it is converted by llama.cpp's own converter, and for
k-quants quantized by llama.cpp's own quantizer (llama_cpp.py), and checked before the export is called
done (check.py): the GGUF carries the run's chat template, persona first, and llama.cpp's runtime gives
the merged model's greedy replies, each ending at the template's end of turn. Everything is written in a
hidden folder beside --out and renamed at the end, so an interrupted export leaves nothing half-written.
With --adapter-only, the adapter alone becomes a GGUF that llama.cpp applies to the base's (adapter.py).
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
                    "q6_k": 0.83, "q5_k_m": 0.72, "q4_k_m": 0.62}  # at most: some tensors keep more bits
MERGE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # config.json's dtype -> merge's
LOGIT_CHECK_LIMIT = 2e9  # parameters: above it, loading the GGUF and the merged model in fp32 is opt-in


def export(location: str, out: str, *, to: str = "gguf", quant: str | None = None, base_model: str | None = None,
           device: str = "auto", check: str = "auto", adapter_only: bool = False, base_gguf: str | None = None,
           echo=print) -> Path:
    from roletune.export import llama_cpp

    target = Path(out)
    quant = quant or ("f16" if adapter_only else "q8_0")
    if quant not in llama_cpp.QUANTS:
        raise RunError(f"{quant}: not a quantization export writes ({', '.join(llama_cpp.QUANTS)})")
    if target.exists():
        raise RunError(f"{out}: exists; choose a new --out (nothing was written)")
    run = open_run(location, base_model)
    if adapter_only:
        from roletune.export.adapter import check_request

        check_request(location, run, to, quant, base_gguf)
    elif base_gguf:
        raise RunError("--base-gguf goes with --adapter-only")
    elif not run.adapter and not Path(run.base).is_dir():
        raise RunError(f"{location}: a whole model is exported from a local folder; download it first")
    kquant = quant in llama_cpp.KQUANTS
    replies = check != "none" and (bool(base_gguf) or not adapter_only)  # llama.cpp's runtime answers
    llama_cpp.check_tools(runtime=kquant or replies)
    converter = llama_cpp.converter_folder()
    config, parameters = _shape(run.base)
    architecture = (config.architectures or ["?"])[0]
    if not llama_cpp.supported(architecture, converter):
        raise RunError(f"{architecture}: llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) cannot "
                       "convert this architecture")
    dtype = MERGE_DTYPES.get(str(getattr(config, "dtype", None) or "").replace("torch.", ""), "bf16")
    if not adapter_only:
        _check_disk(target.parent, parameters, quant, BYTES_PER_WEIGHT[dtype] * (bool(run.adapter) + kquant))

    name = Path(location).resolve().name
    work = target.parent / f".{target.name}.partial"
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted export of the same --out left
    work.mkdir(parents=True)
    try:
        if adapter_only:
            from roletune.export.adapter import write_adapter

            gguf, checks = write_adapter(location, run, work, name, quant, config, converter, base_gguf=base_gguf,
                                         base_model=base_model, check=check, device=device, to=to, echo=echo)
        else:
            gguf, checks = _write_model(location, run, work, name, quant, dtype, parameters, converter,
                                        base_model=base_model, check=check, device=device, to=to, echo=echo)
        record = {"run": str(Path(location).resolve()), "base": run.base, "to": to, "quant": quant,
                  "adapter_only": adapter_only, "base_gguf": str(Path(base_gguf).resolve()) if base_gguf else None,
                  "llama_cpp_python": llama_cpp.version(), "checks": checks, "roletune": __version__}
        (work / "roletune_export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    written = target / gguf.name
    echo(f"{written}: {written.stat().st_size / 2**20:.1f} MiB")
    if to == "ollama":
        echo(f"ollama create {name} -f {target / 'Modelfile'}")
    return written


def _write_model(location: str, run, work: Path, name: str, quant: str, dtype: str, parameters: int,
                 converter: Path, *, base_model, check, device, to, echo) -> tuple[Path, dict]:
    """The run merged (or a plain model as it is), converted, quantized, checked; the Modelfile for Ollama."""
    from roletune.export import llama_cpp
    from roletune.export.check import reply_prompts
    from roletune.export.ollama import write_modelfile
    from roletune.merge import merge

    if run.adapter:
        merged = work / "merged"
        merge(location, str(merged), dtype=dtype, device=device, base_model=base_model,
              echo=lambda line: None if line.startswith("merged model:") else echo(line))  # not where it stays
    else:
        merged = Path(run.base)
    gguf = work / f"{name}-{quant}.gguf"
    if quant in llama_cpp.KQUANTS:  # the quantizer starts from a file in the merged weights' own dtype
        whole = work / f"{name}-{dtype}.gguf"
        echo(f"converting with llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) to {dtype}")
        llama_cpp.convert(merged, whole, dtype, converter)
        echo(f"quantizing with llama.cpp's quantizer to {quant}")
        llama_cpp.quantize(whole, gguf, quant)
        whole.unlink()
    else:
        echo(f"converting with llama.cpp's converter (llama-cpp-python {llama_cpp.version()}) to {quant}")
        llama_cpp.convert(merged, gguf, quant, converter)
    checks = _check(merged, gguf, quant, parameters, check, device, reply_prompts(location), echo)
    if to == "ollama":
        write_modelfile(work, merged, merged, run.system_prompt, f"./{gguf.name}", None, echo)
    if run.adapter:
        shutil.rmtree(merged)
    return gguf, checks


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


def _check(merged: Path, gguf: Path, quant: str, parameters: int, check: str, device: str, prompts: list[str],
           echo) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roletune.export.check import chat_template, logits, replies
    from roletune.merge import PROBES
    from roletune.model import resolve_device

    tokenizer = AutoTokenizer.from_pretrained(merged)
    if chat_template(gguf) != tokenizer.chat_template:
        raise RunError("GGUF check failed: the file does not carry the merged model's chat template; nothing was "
                       "written")
    checks = {"chat_template": "the merged model's, persona first"}
    if check != "none":
        model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").to(resolve_device(device))
        # no system message: the merged template opens with the persona
        checks["replies"] = replies(model, tokenizer, gguf, [[{"role": "user", "content": p}] for p in prompts],
                                    echo=echo)
        del model
    if check == "logits" or (check == "auto" and parameters <= LOGIT_CHECK_LIMIT):
        checks["logits"] = logits(merged, gguf, quant, PROBES, echo)
    elif check == "auto":
        echo(f"logit check skipped ({parameters / 1e9:.1f}B parameters); --check logits runs it")
    return checks
