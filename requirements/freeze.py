"""Write what a virtual environment holds as pins, and the table of the main ones in docs/installs.md.

    python requirements/freeze.py VENV PINS_FILE

`make pins` calls it once the suite has passed on the newest releases. pip's own freeze lists the
versions; this adds only what pip lacks: torch by version alone (the CPU and CUDA builds differ in a
local label, +cpu or +cu128, and the pin must serve both) and a header saying where the pins were made.
"""
from __future__ import annotations

import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "installs.md"
# The packages a reader of docs/installs.md asks about; the pins files hold every other one too.
MAIN = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub",
        "safetensors", "swanlab", "bitsandbytes", "liger-kernel")
TABLE = re.compile(r"(<!-- pins -->\n).*?(<!-- /pins -->)", re.S)


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of a pins file (none while it is still to be written)."""
    pins = {}
    if not path.exists():
        return pins
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(venv: Path) -> list[str]:
    # --all: setuptools is a dependency too (torch, swanlab and tensorboard import it); pip itself is not.
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines()
             if "==" in line and not line.startswith("pip==")]  # `name @ file://` lines are not releases
    return sorted((line.split("+", 1)[0] for line in lines), key=str.lower)


def write_pins(venv: Path, path: Path) -> None:
    header = (f"# Installed together and tested on {date.today()}: Python {platform.python_version()}, "
              f"{sys.platform} {platform.machine()}.\n"
              "# Written by `make pins`; see docs/installs.md. Do not edit by hand.\n")
    path.write_text(header + "".join(line + "\n" for line in freeze(venv)), encoding="utf-8")


def table(pins: Path, oldest: Path) -> str:
    """The main packages' versions in both pin sets, as the Markdown table docs/installs.md shows."""
    main, old = read_pins(pins), read_pins(oldest)
    rows = [f"| {name} | {main.get(name, '-')} | {old.get(name, '-')} |\n" for name in MAIN]
    return "| package | `make test` | `make test-oldest` |\n| --- | --- | --- |\n" + "".join(rows)


def write_table(pins: Path, oldest: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(TABLE.sub(lambda m: m[1] + table(pins, oldest) + m[2], text), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    venv, target = Path(sys.argv[1]), Path(sys.argv[2])
    write_pins(venv, target)
    write_table(ROOT / "requirements" / "pins.txt", ROOT / "requirements" / "pins-oldest.txt")
    print(f"{target}: {len(read_pins(target))} packages pinned")
