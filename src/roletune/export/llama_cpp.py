"""llama.cpp's own tools: its converter (convert_hf_to_gguf.py, its `conversion` package and the `gguf-py` it
was written with), taken from the llama-cpp-python source distribution on PyPI, and its quantizer, through
the `llama_cpp` binding that pip compiles from that distribution.

llama-cpp-python's wheel holds only the runtime; its sdist carries the whole llama.cpp tree under
vendor/llama.cpp. The converter is fetched once, from the sdist of the llama-cpp-python installed (else
the version roletune's `gguf` extra pins), into a cache folder, and run in a process of its own: it puts
its gguf-py on sys.path and sets up logging as a script does. The quantizer runs in a process of its own
too, so that its log stays out of the terminal unless it fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from roletune.errors import RunError

PINNED = "0.3.36"  # llama-cpp-python, as pyproject.toml's gguf extra pins it
PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
OUTTYPES = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "fp32": "f32"}  # what the converter writes itself
KQUANTS = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # what llama.cpp's quantizer makes from the converter's file
QUANTS = ("f16", "bf16", "q8_0", *KQUANTS)
INSTALL = "pip install 'roletune[gguf]' (pip compiles llama.cpp: minutes)"


def version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return PINNED


def converter_folder() -> Path:
    """Where the converter is: ROLETUNE_LLAMA_CPP (a llama.cpp checkout, or a folder this module filled),
    else the cache, fetched into it the first time."""
    given = os.environ.get("ROLETUNE_LLAMA_CPP")
    if given:
        folder = Path(given)
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise RunError(f"ROLETUNE_LLAMA_CPP={given}: no convert_hf_to_gguf.py there; point it at a llama.cpp "
                           "checkout, or unset it to fetch the converter")
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roletune" / f"llama.cpp-{version()}"
    if not (cache / "convert_hf_to_gguf.py").is_file():
        fetch(cache)
    return cache


def fetch(folder: Path, echo=print) -> Path:
    """The converter's parts from the llama-cpp-python sdist of version(), into `folder` (complete or not
    at all: unpacked aside, then renamed)."""
    echo(f"fetching llama.cpp's converter from the llama-cpp-python {version()} source distribution into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                               "--dest", work, f"llama-cpp-python=={version()}"], capture_output=True, text=True)
        archives = list(Path(work).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise RunError(f"cannot download the llama-cpp-python {version()} source distribution ({last}); "
                           "set ROLETUNE_LLAMA_CPP to a llama.cpp checkout instead")
        unpacked = Path(work) / "llama.cpp"
        with tarfile.open(archives[0]) as archive:
            root = archive.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in archive.getmembers()
                       if m.name.startswith(root) and m.name[len(root):].split("/")[0] in PARTS]
            for member in members:
                member.name = member.name[len(root):]
            archive.extractall(unpacked, members=members, filter="data")
        missing = [part for part in PARTS if not (unpacked / part).exists()]
        if missing:
            raise RunError(f"llama-cpp-python {version()}'s source distribution has no {', '.join(missing)} "
                           "under vendor/llama.cpp; set ROLETUNE_LLAMA_CPP to a llama.cpp checkout instead")
        shutil.rmtree(folder, ignore_errors=True)
        unpacked.rename(folder)
    return folder


def check_tools(runtime: bool) -> None:
    """The converter's own imports (beyond torch, numpy and transformers), and llama.cpp's runtime when the
    quantizer or the reply check needs it, named in one line."""
    missing = [name for name in ("sentencepiece", "gguf") if not _importable(name)]
    if runtime and not _importable("llama_cpp"):
        missing.append("llama-cpp-python")
    if missing:
        raise RunError(f"export needs {' and '.join(missing)}: {INSTALL}")


def supported(architecture: str, folder: Path) -> bool:
    """Whether llama.cpp's converter has a class for a transformers architecture (config.json's)."""
    done = _run([str(folder / "convert_hf_to_gguf.py"), "--print-supported-models"])
    return architecture in (done.stdout + done.stderr).split()  # the list goes to its log


def convert(model: Path, outfile: Path, outtype: str, folder: Path) -> None:
    """model (a transformers folder) -> outfile, with llama.cpp's converter."""
    _make(outfile, "llama.cpp's converter", [str(folder / "convert_hf_to_gguf.py"), str(model), "--outfile",
                                             str(outfile), "--outtype", OUTTYPES[outtype]])


def convert_lora(adapter: Path, base_config: Path, outfile: Path, outtype: str, folder: Path) -> None:
    """A peft LoRA folder -> outfile, with llama.cpp's LoRA converter; base_config: a folder with the base's
    config.json (its weights are not read)."""
    _make(outfile, "llama.cpp's LoRA converter", [str(folder / "convert_lora_to_gguf.py"), str(adapter), "--base",
                                                  str(base_config), "--outfile", str(outfile), "--outtype",
                                                  OUTTYPES[outtype]])


def quantize(source: Path, outfile: Path, quant: str) -> None:
    """source (the converter's f32, f16 or bf16 GGUF) -> outfile, with llama.cpp's quantizer."""
    _make(outfile, "llama.cpp's quantizer", ["-m", __name__, "quantize", str(source), str(outfile), quant])


def _quantize_here(source: str, outfile: str, quant: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[quant])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), outfile.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize returned an error for {source}")


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    """Python on `arguments`, in a process of its own, its output kept (offline: the base is local)."""
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _make(outfile: Path, tool: str, arguments: list[str]) -> None:
    """Run a tool that writes `outfile`; a RunError with the last line it printed when it did not."""
    done = _run(arguments)
    if done.returncode != 0 or not outfile.is_file():
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        raise RunError(f"{tool} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    if sys.argv[1] == "quantize":  # quantize SOURCE OUTFILE QUANT: as quantize() runs it
        _quantize_here(*sys.argv[2:5])
    elif not (Path(sys.argv[2]) / "convert_hf_to_gguf.py").is_file():  # fetch FOLDER: the converter there (make)
        fetch(Path(sys.argv[2]))
