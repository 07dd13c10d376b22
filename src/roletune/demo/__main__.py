"""python -m roletune.demo OUT_DIR: build the demo's tiny Qwen2 model and tokenizer (offline)."""
import sys

from roletune.demo.model import build_tiny_model

if len(sys.argv) != 2:
    sys.exit("usage: python -m roletune.demo OUT_DIR")
print(f"demo model: {build_tiny_model(sys.argv[1])}")
