"""The benchmark scripts, rehearsed small on the CPU so that they are not found broken when they are run: the
GPU script (benchmarks/gpu_run.sh, REHEARSAL=1; every step it takes on a GPU runs here on the tiny model) and
the serving throughput."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.benchmark
def test_the_gpu_script_rehearses_on_the_cpu(shared, tiny_model, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "REHEARSAL": "1", "PYTHON": sys.executable}
    # 6 steps a variant (profiling needs 6), within 6 minutes: what the rehearsal could not reach is cut short.
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_run.sh"), str(out), "360", "6"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "gpu_run.log").read_text(encoding="utf-8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]
    rows = [json.loads(line) for line in (out / "train_speed.jsonl").read_text().splitlines()]
    variants = {row["variant"] for row in rows}
    assert {"seed", "bs16", "roletune"} <= variants, variants  # the peer and roletune, measured in one run
    whole = json.loads((out / "run_time.jsonl").read_text().splitlines()[0])
    assert whole["optimizer_steps"] == 12 and whole["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.benchmark
def test_the_serving_benchmark_runs_small(trained_run):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_throughput.py"), str(trained_run),
                           "--requests", "4", "--tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert set(report["results"]) == set(report["generate_ceiling"]) == {"1", "8", "32"}
    assert report["results"]["1"]["vs_one_at_a_time"] == 1.0 and report["results"]["8"]["p95_s"] > 0
