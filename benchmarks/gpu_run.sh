#!/usr/bin/env bash
# One GPU session's measurements, in one go and inside a time budget, what matters most first: whether
# CUDA graphs of the layers train what eager layers train (benchmarks/graph_check.py), the
# training-speed comparison against the seed recipe (roletune's default path with Liger-Kernel's loss and layer
# kernels, profiled at its end, without each of them, and with its layers replayed from CUDA graphs), a whole
# 3-epoch run of the fast config with CUDA graphs timed end to end (benchmarks/run_time.py), roletune with its
# decoder layers compiled (profiled) and with torch.compile's CUDA graphs, roletune with levers turned back in
# turn (the memory estimate next to the measured peaks), roletune on a 4-bit base (QLoRA, bitsandbytes), then,
# with whatever time is left, decoding with the adapter
# (benchmarks/decode_time.py), the host time of a step's operators per lever (benchmarks/host_time.py) and
# between steps (benchmarks/step_gap.py), what a checkpoint of the 7B adapter costs this host
# (benchmarks/checkpoint_time.py), and the whole model compiled. Each run's figures are appended to
# OUT_DIR/train_speed*.jsonl (run_time.jsonl for the whole run) as soon as it ends, so a run cut short by
# the budget keeps what it measured.
# Needs ../shared or a copy of it at .shared (bench/, tokenizers/, data/, models/); roletune runs
# from src/ without installing, so a machine with torch, transformers, peft and accelerate suffices.
# Optional packages for a machine without a package index: put their wheels in .whl/, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_24_x86_64 -d .whl liger-kernel==0.8.5 bitsandbytes==0.50.2
# Each is installed into a folder of its own and used only by the run that needs it, after the main
# comparison, so a package that fails there costs that run alone.
# usage: benchmarks/gpu_run.sh OUT_DIR [SECONDS (default 540)] [STEPS (default 20)]
# REHEARSAL=1 runs every step on this machine's CPU with the tiny demo model instead (a few steps each, a
# short whole run), to check the script end to end before a GPU's minutes are spent on it.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUT_DIR [SECONDS] [STEPS]}
deadline=$((SECONDS + ${2:-540}))
steps=${3:-20}
py=${PYTHON:-python3}  # PYTHON=... picks another interpreter
if [ -n "${REHEARSAL:-}" ]; then
  dev=cpu; on=(--device cpu --tiny); whole=(train.max_steps=12 train.save_steps=5)
else
  dev=cuda; on=(); whole=()
fi
left() { local s=$((deadline - SECONDS)); echo $((s > 1 ? s : 1)); }  # at least 1: `timeout 0` never times out
cap() { local s; s=$(left); echo $((s < $1 ? s : $1)); }  # the time left, at most $1 seconds
here=$(cd "$(dirname "$0")/.." && pwd)
shared=$here/.shared
[ -d "$shared" ] || shared=$here/../shared
mkdir -p "$out"
export PYTHONPATH=$here/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1  # nothing to download: no library may wait on the network
site=/tmp/roletune-site  # site/NAME holds the wheel NAME-*.whl, for that run's PYTHONPATH only
for wheel in "$here"/.whl/*.whl; do
  [ -e "$wheel" ] || continue
  name=$(basename "$wheel")
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/${name%%-*}" "$wheel" \
      || echo "could not install $wheel"
done
# Those not yet measured on a GPU first (benchmarks/results/h200-2026-11-30.md has the others).
levers=all-logits,checkpointing,unfused-lora,kept-lora-dropout,fp32-lora-inputs,plain-norm-mlp,24GiB-budget,no-packing,sdpa-attention,waiting-steps
{
  # Nothing before the main comparison may stop the script: each prints its failure and the script goes on.
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
  "$py" -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)' || echo "no versions"
  "$py" -m roletune train "$here/configs/huanhuan-qwen2.5-7b-fast.yaml" --dry-run \
      model.path="$shared/models/qwen2.5-7b-instruct" model.tokenizer="$shared/tokenizers/qwen2.5" \
      data.path="$shared/data/huanhuan.json" train.memory_budget_gib=24 | tail -8 || echo "the dry run failed"
  # Whether the layers replayed from CUDA graphs train what eager ones train, here (a small model, seconds).
  PYTHONPATH=$PYTHONPATH:$site/liger_kernel timeout 120 "$py" "$here/benchmarks/graph_check.py" 2>&1 \
      | grep -v "it/s" | tail -20 | tee "$out/graph_check.txt" || echo "the graph check failed"
  # The seed recipe and roletune's default path (profiled: with Liger-Kernel importable, its loss and layer
  # kernels), then in the same launch roletune without each of Liger's (chunked-head, torch-kernels), roletune
  # with q/k/v and gate/up's LoRA work grouped (lora.grouped) and with its layers replayed from CUDA graphs
  # (train.cuda_graphs, last).
  PYTHONPATH=$PYTHONPATH:$site/liger_kernel timeout "$(left)" "$py" "$here/benchmarks/train_speed.py" ${on[@]+"${on[@]}"} \
      --profile --levers=chunked-head,torch-kernels --grouped-lora --cuda-graphs --steps "$steps" --shared "$shared" \
      --out "$out/train_speed.jsonl" || echo "stopped by the time budget; rows so far are kept"
  # The target itself: a whole 3-epoch run of the fast config, checkpoints and sample answers included (about
  # 200 s with the defaults on the H200 of 2026-11-30), with CUDA graphs, and Liger-Kernel if it loads.
  if [ "$(left)" -gt 200 ]; then
    PYTHONPATH=$PYTHONPATH:$site/liger_kernel timeout "$(($(left) - 30))" "$py" "$here/benchmarks/run_time.py" ${on[@]+"${on[@]}"} \
        --peer-steps 0 --shared "$shared" --out "$out/run_time.jsonl" train.cuda_graphs=true ${whole[@]+"${whole[@]}"} 2>&1 \
        | tail -40 || echo "the whole run failed or ran out of time"
  fi
  # roletune with its decoder layers compiled (profiled), the same with CUDA graphs, against roletune again.
  # On the H200 of 2026-11-30 compiling the layers took longer than 105 s (the launch's own ~30 s included):
  # given several minutes, capped so the runs after it keep some time.
  timeout "$(cap 240)" "$py" "$here/benchmarks/train_speed.py" ${on[@]+"${on[@]}"} --no-peer --profile --compile=layers,graphs \
      --steps "$steps" --shared "$shared" --out "$out/train_speed.jsonl" \
      || echo "stopped by the time budget; rows so far are kept"
  # What each lever buys, against roletune measured again, all in one launch (capped, like the compiled runs).
  timeout "$(cap 150)" "$py" "$here/benchmarks/train_speed.py" ${on[@]+"${on[@]}"} --no-peer --levers="$levers" \
      --steps "$steps" --shared "$shared" --out "$out/train_speed.jsonl" \
      || echo "stopped by the time budget; rows so far are kept"
  # bitsandbytes may also be installed already; without it the QLoRA run says so in one line.
  if [ "$(left)" -gt 90 ]; then
    PYTHONPATH=$PYTHONPATH:$site/bitsandbytes timeout "$(cap 90)" "$py" "$here/benchmarks/train_speed.py" ${on[@]+"${on[@]}"} --no-peer \
        --qlora --steps "$steps" --shared "$shared" --out "$out/train_speed_qlora.jsonl" \
        || echo "the QLoRA run failed or ran out of time"
  fi
  if [ "$(left)" -gt 60 ]; then  # what a tuned model's decoding costs beyond its base's, peft's forward and ours
    timeout 60 "$py" "$here/benchmarks/decode_time.py" --device "$dev" | tee "$out/decode_time.txt" \
        || echo "the decoding-time run failed"
  fi
  # What launching a step's operators costs this machine's host, per lever (under a minute). Its timings print only
  # at its end: two rounds, not three, so it ends inside its minute (three did not on the 2-core CPU's rehearsal).
  if [ "$(left)" -gt 60 ]; then
    timeout 60 "$py" "$here/benchmarks/host_time.py" --device "$dev" --rounds 2 | tee "$out/host_time.txt" \
        || echo "the host-time run failed"
  fi
  if [ "$(left)" -gt 60 ]; then  # the host's time between steps, roletune's bookkeeping against Trainer's
    timeout 60 "$py" "$here/benchmarks/step_gap.py" --steps 20 --rounds 1 | tail -5 | tee "$out/step_gap.txt" \
        || echo "the step-gap run failed"
  fi
  if [ "$(left)" -gt 60 ]; then  # a checkpoint of the 7B adapter on this host: on the training thread, and sealed beside
    timeout 60 "$py" "$here/benchmarks/checkpoint_time.py" --rounds 3 --shared "$shared" 2>&1 | tail -12 \
        | tee "$out/checkpoint_time.txt" || echo "the checkpoint-time run failed"
  fi
  # The whole model compiled can take minutes: last, with what is left, so the figures above are kept either way.
  if [ "$(left)" -gt 120 ]; then
    timeout "$(left)" "$py" "$here/benchmarks/train_speed.py" ${on[@]+"${on[@]}"} --no-peer --compile=true --steps 40 --shared "$shared" \
        --out "$out/train_speed_compile.jsonl" || echo "compile run did not finish in the time left"
  else
    echo "no time left for the whole-model compile run"
  fi
} 2>&1 | tee "$out/gpu_run.log"
