#!/usr/bin/env bash
# One GPU session's measurements, in one go: the training-speed comparison against the seed recipe
# with every lever turned back in turn, and the memory estimate next to the measured peaks.
# Needs ../shared or a copy of it at .shared (bench/, tokenizers/, data/, models/); roletune runs
# from src/ without installing, so a machine with torch, transformers, peft and accelerate suffices.
# Optional packages for a machine without a package index: put their wheels in .whl/ (e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl liger-kernel==0.8.5
# for the fused LM-head loss) and they are installed into a scratch folder first.
# usage: benchmarks/gpu_run.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUT_DIR [STEPS]}
steps=${2:-20}
here=$(cd "$(dirname "$0")/.." && pwd)
shared=$here/.shared
[ -d "$shared" ] || shared=$here/../shared
mkdir -p "$out"
export PYTHONPATH=$here/src${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$here/.whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/roletune-site "$here"/.whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/roletune-site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
  python -m roletune train "$here/configs/huanhuan-qwen2.5-7b-fast.yaml" --dry-run \
      model.path="$shared/models/qwen2.5-7b-instruct" model.tokenizer="$shared/tokenizers/qwen2.5" \
      data.path="$shared/data/huanhuan.json" train.memory_budget_gib=24 | tail -8
  python "$here/benchmarks/train_speed.py" --levers --steps "$steps" --shared "$shared" --out "$out/train_speed.jsonl"
  # Compiling a 7B model can take minutes: last, and bounded, so the figures above are kept either way.
  timeout 240 python "$here/benchmarks/train_speed.py" --no-peer --compile --steps 40 --shared "$shared" \
      --out "$out/train_speed_compile.jsonl" || echo "compile run did not finish in 240 s"
} 2>&1 | tee "$out/gpu_run.log"
