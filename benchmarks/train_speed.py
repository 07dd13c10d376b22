"""Training speed: roletune's default path against the seed recipe, in one launch on one machine.

Runs the reference peer (shared/bench/seed_recipe.py: the seed's exact recipe, and its plain
bs-16 variant) and roletune's trainer on the same model config (random weights) and the same
huanhuan data, each in its own process so peak memory is its own, then prints a table and
`speedup_vs_seed=X.XX`.

usage:
  python benchmarks/train_speed.py                      # Qwen2.5-7B architecture on the GPU
  python benchmarks/train_speed.py --device cpu --tiny  # the demo's tiny Qwen2 on the CPU
  python benchmarks/train_speed.py --levers             # also roletune with one lever off at a time
  python benchmarks/train_speed.py --levers=no-packing,all-logits   # only those levers
  python benchmarks/train_speed.py --no-peer --compile  # roletune without torch.compile, by layer (without and
                                                         # with CUDA graphs), whole
  python benchmarks/train_speed.py --no-peer --compile=layers,graphs  # by layer only
  python benchmarks/train_speed.py --no-peer --profile  # where a step's time goes: GPU busy or launching
  python benchmarks/train_speed.py --cuda-graphs        # also roletune with its layers replayed from CUDA graphs
  python benchmarks/train_speed.py --grouped-lora       # also roletune with q/k/v and gate/up's LoRA work grouped
  python benchmarks/train_speed.py --qlora              # also roletune on a 4-bit base (its memory and speed)
options: --steps N (optimizer steps per side), --shared DIR (holds bench/, tokenizers/, data/),
         --model-config DIR, --out FILE.jsonl (append each run's figures as soon as it ends)
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

STARTED = time.time()  # this process's start, near enough: what a launch costs before its first step

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_TOKEN_FACTOR = 4  # forward + activation gradients of the non-embedding weights (as the peer counts)
# roletune with one lever turned back to what the seed does, to say what each lever buys.
LEVERS = {
    "no-packing": ["train.packing=false"],
    "sdpa-attention": ["model.attn_implementation=sdpa"],  # the default picks varlen where its kernel runs
    "all-logits": ["train.reply_logits_only=false"],
    "full-head": ["train.lm_head_loss=full"],
    "chunked-head": ["train.lm_head_loss=chunked"],  # differs from the default only where Liger is installed
    "fp32-lora-inputs": ["lora.dtype=fp32"],
    "kept-lora-dropout": ["lora.recompute_dropout=false"],
    "unfused-lora": ["lora.fused=false"],
    "plain-norm-mlp": ["train.lean_activations=false"],
    "torch-kernels": ["train.liger_kernels=false"],  # differs from the default only where Liger is installed
    "24GiB-budget": ["train.memory_budget_gib=24"],
    "checkpointing": ["train.gradient_checkpointing=true"],
    "waiting-steps": ["train.run_ahead=false"],
}
# An option for small cards rather than a lever: what the 4-bit base saves in memory and costs in time.
QLORA = {"+qlora-4bit": ["model.quantization=4bit"]}
# Off by default: on only if this shows it pays. Layers first: the whole model is far more to trace, so a
# time limit is likelier to cut that run short.
COMPILE = {"+compile-layers": ["train.compile=layers"],
           "+compile-layers-graphs": ["train.compile=layers", "train.compile_mode=reduce-overhead"],
           "+compile": ["train.compile=true"]}
COMPILE_CHOICES = {"layers": "+compile-layers", "graphs": "+compile-layers-graphs", "true": "+compile"}
# The layers' forward and backward replayed from CUDA graphs recorded without torch.compile (train.cuda_graphs):
# off by default, on only if this shows it pays.
GRAPHS = {"+cuda-graphs": ["train.cuda_graphs=true"]}
# q/k/v and gate/up sharing their dropout draw and lora_A matmuls (lora.grouped): off by default, on only if this
# shows it pays.
GROUPED = {"+grouped-lora": ["lora.grouped=true"]}
VARIANTS = {"roletune": [], **LEVERS, **COMPILE, **GRAPHS, **GROUPED, **QLORA}  # every variant's overrides, by name
PROFILED_STEPS = 3
LOGGED_STEPS = 3  # their losses are shown beside the peer's
TOP_OPERATORS = 15
SHORT_KERNEL_US = 10  # a kernel this short on average is mostly its own launch and tail
FAILED: list[list[str]] = []  # the runs that exited non-zero
TOKENIZED: dict = {}  # a worker's tokenizer and data, by what they are made from (tokenized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny Qwen2 instead of Qwen2.5-7B")
    parser.add_argument("--steps", type=int, help="optimizer steps per side (default 30 on GPU, 6 on CPU)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--model-config", help="folder with the model's config.json")
    parser.add_argument("--out", help="append each run's figures to this file as a JSON line when it ends")
    parser.add_argument("--levers", nargs="?", const=",".join(LEVERS), default="",
                        help=f"also run roletune with each lever off in turn: all, or some of {','.join(LEVERS)}")
    parser.add_argument("--compile", nargs="?", const=",".join(COMPILE_CHOICES), default="",
                        help="also run roletune with its layers compiled (layers), the same with CUDA graphs (graphs), "
                             "the whole model compiled (true); --compile=layers,graphs: some of them")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also run roletune with its layers replayed from CUDA graphs (train.cuda_graphs), last "
                             "in roletune's launch")
    parser.add_argument("--grouped-lora", action="store_true",
                        help="also run roletune with the LoRA branches that read one input grouped (lora.grouped), in "
                             "roletune's launch before the graphed layers")
    parser.add_argument("--qlora", action="store_true",
                        help="also run roletune with its base quantised to 4 bits by bitsandbytes (QLoRA)")
    parser.add_argument("--no-peer", action="store_true", help="skip the seed recipe (compare roletune variants only)")
    parser.add_argument("--profile", action="store_true",
                        help=f"profile the last {PROFILED_STEPS} steps of roletune and of its compiled layers (left out "
                             "of their timing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: these variants (a,b,...) in this process
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # on top of every variant's
    args = parser.parse_args()
    if args.worker:
        return roletune_worker(args)

    steps = args.steps or (30 if args.device == "cuda" else 6)
    if args.profile and steps < PROFILED_STEPS + 3:
        parser.error(f"--profile needs --steps {PROFILED_STEPS + 3} or more: "
                     f"{PROFILED_STEPS} profiled after the timed ones")
    levers = [name for name in args.levers.split(",") if name]
    compiled = [name for name in args.compile.split(",") if name]
    if unknown := sorted(set(compiled) - set(COMPILE_CHOICES)):
        parser.error(f"--compile: unknown {','.join(unknown)}; known: {','.join(COMPILE_CHOICES)}")
    if unknown := sorted(set(levers) - set(LEVERS)):
        parser.error(f"--levers: unknown {','.join(unknown)}; known: {','.join(LEVERS)}")
    with tempfile.TemporaryDirectory() as scratch:
        config_dir = model_config_dir(args, Path(scratch))
        results = Path(scratch) / "results.jsonl"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")
                   if args.device == "cuda" else "")
        peer = Path(args.shared) / "bench" / "seed_recipe.py"
        kept = Kept(results, args.out)
        # timeout(1), which gpu_run.sh stops a launch with, sends SIGTERM: raised here as SystemExit, so the rows the
        # runs wrote before it (a stopped worker's finished variants included) are still copied to --out.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            for variant in () if args.no_peer else ("seed", "bs16"):
                run([sys.executable, str(peer), variant, str(config_dir), str(steps), str(results), args.shared], env)
                kept.update()
            for names in worker_launches(args, levers, compiled):
                # The default path and compiled layers: does a step wait on the GPU or on the host launching it?
                # (Not under CUDA graphs, whose recording of a new length should not meet the profiler's hooks.)
                profile = ["--profile"] if args.profile and names[0] in ("roletune", "+compile-layers") else []
                run([sys.executable, __file__, "--worker", ",".join(names), "--device", args.device, "--steps", str(steps),
                     "--shared", args.shared, "--model-config", str(config_dir), "--out", str(results), *profile], env)
                kept.update()
        finally:
            kept.update()
            report(kept.rows)
    if FAILED:
        sys.exit(f"{len(FAILED)} run(s) failed; see above")


def worker_launches(args, levers: list[str], compiled: list[str]) -> list[list[str]]:
    """The roletune variants each worker launch runs, in order.
    roletune and its levers in one launch (imports and CUDA's start paid once, each variant's memory freed before
    the next); compiled layers and the 4-bit base each in their own, whose changes to the layers' classes and to
    the loaded weights must not reach another variant. The graphed layers last in roletune's launch: a recording
    that went wrong could leave CUDA unusable."""
    graphs = list(GRAPHS) if args.cuda_graphs else []
    grouped = list(GROUPED) if args.grouped_lora else []
    return [["roletune", *levers, *grouped, *graphs], *([COMPILE_CHOICES[choice]] for choice in compiled),
            *([name] for name in (QLORA if args.qlora else {}))]


class Kept:
    """The rows the runs have written so far, copied to --out as each run ends, so a launch stopped by a
    time limit keeps what it measured."""

    def __init__(self, results: Path, out: str | None):
        self.results, self.out, self.rows = results, Path(out) if out else None, []
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def update(self) -> None:
        # Whole lines only: a worker stopped while writing one leaves it unfinished.
        lines = self.results.read_text().split("\n")[:-1] if self.results.exists() else []
        new = [json.loads(line) for line in lines[len(self.rows):]]
        self.rows += new
        if self.out:
            with open(self.out, "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in new)


def model_config_dir(args, scratch: Path) -> Path:
    if args.model_config:
        return Path(args.model_config)
    if args.tiny:
        folder = scratch / "tiny-qwen2"
        folder.mkdir()
        shutil.copy(ROOT / "src" / "roletune" / "demo" / "tiny-qwen2.json", folder / "config.json")
        return folder
    return Path(args.shared) / "models" / "qwen2.5-7b-instruct"


def run(command: list[str], env: dict) -> None:
    """One side in its own process. A side that fails (an optional package missing, say) is reported and
    the others still run: its row is missing from the table, and the launch exits non-zero at the end."""
    print(time.strftime("[%H:%M:%S]"), "$", " ".join(command), flush=True)  # when: what a launch costs
    if code := subprocess.run(command, env=env).returncode:
        print(f"that run failed (exit {code}); the table has no row for it", flush=True)
        FAILED.append(command)


def roletune_worker(args) -> None:
    """roletune's training path as `roletune train` runs it (memory decision, LoRA, Trainer), with the
    base's weights drawn from its config (random_base), for each variant named in --worker in turn."""
    import torch

    import roletune.train  # noqa: F401 - with transformers, peft and accelerate: imported once, timed here

    imports_s = time.time() - STARTED
    cuda = args.device == "cuda" and torch.cuda.is_available()
    failed = []
    for index, name in enumerate(args.worker.split(",")):
        try:
            row = measure(name, VARIANTS[name] + args.set, args, cuda, profile=args.profile and index == 0)
        except Exception:  # noqa: BLE001 - one variant failing (out of memory, say) must not cost the others
            traceback.print_exc()
            print(f"{name} failed; the table has no row for it", flush=True)
            failed.append(name)
            row = None
        gc.collect()  # this variant's model, optimizer and Trainer, before the next one's peak is measured
        if cuda:
            torch.cuda.empty_cache()
        if row is not None:
            row["imports_s"] = round(imports_s, 1)  # the launch's, paid once for all its variants
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    if failed:
        sys.exit(f"{', '.join(failed)} failed")


def measure(name: str, overrides: list[str], args, cuda: bool, profile: bool) -> dict:
    """One variant: its model built, `args.steps` optimizer steps timed, and its figures."""
    import torch
    from transformers import TrainerCallback

    from roletune import train
    from roletune.config import config_from_dict
    from roletune.model import resolve_dtype
    from roletune.speed import attention, layer_graphs
    from roletune.training import memory

    variant_started = time.time()
    # What the variants before it left allocated (none, if each was freed): its peak includes this.
    baseline_gib = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None
    shared = Path(args.shared)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        raw = {
            "model": {"path": args.model_config, "tokenizer": str(shared / "tokenizers" / "qwen2.5"),
                      "device": str(device)},
            "data": {"path": str(shared / "data" / "huanhuan.json"),
                     "system_prompt": "现在你要扮演皇帝身边的女人--甄嬛", "max_length": 384},
            "lora": {"r": 8, "alpha": 32, "dropout": 0.1},
            # Same optimization as the seed: 16 rows per optimizer step, lr 1e-4, linear schedule.
            # Logged: the first LOGGED_STEPS steps only (Clock), as a stretch of a run between two logs.
            "train": {"batch_size": 16, "grad_accum": 1, "lr": 1e-4, "max_steps": args.steps, "logging_steps": 10**9,
                      "save_steps": 10**9, "report_to": "none"},
            "output_dir": scratch}
        cfg = config_from_dict(raw, overrides)
        tokenizer, data = tokenized(cfg)
        dtype = resolve_dtype(cfg.model.dtype, device)
        decision = memory.for_run(cfg, data.train, device, dtype)
        print(decision.line(), flush=True)

        started = time.time()
        train.load_base_model = random_base
        model = train.build_model(cfg, device, print, decision.layers)
        init_s = time.time() - started

        class Clock(TrainerCallback):
            """Each step's end on the host's clock. The GPU is waited for only where the timed stretch begins
            and ends: waiting at every step would stop the host queueing a step while the GPU finishes the one
            before, as it does in a run (train.run_ahead). The first steps are logged, for their losses."""

            def __init__(self, synced: set):
                self.marks, self.began, self.synced = [], None, synced

            def on_train_begin(self, a, state, control, **kwargs):
                self.began = time.time()
                print(f"{name}: training starts {self.began - variant_started:.1f} s after the variant's start, "
                      f"{self.began - STARTED:.1f} s after the launch", flush=True)

            def on_step_end(self, a, state, control, **kwargs):
                control.should_log = control.should_log or state.global_step <= LOGGED_STEPS
                if cuda and state.global_step in self.synced:
                    torch.cuda.synchronize()
                self.marks.append((time.time(), state.num_input_tokens_seen))
                if state.global_step <= warm or state.global_step % 10 == 0:  # a run cut short still says
                    print(f"{name}: step {state.global_step} ends {self.marks[-1][0] - self.began:.1f} s into training",
                          flush=True)  # how far it got: compiling happens in the first steps

        last_timed = args.steps - PROFILED_STEPS if profile else args.steps  # profiling slows its own steps
        warm = 3 if last_timed > 6 else 1  # the untimed first steps
        clock = Clock({warm, last_timed})
        profiler = StepProfiler(args.steps - PROFILED_STEPS + 1, cuda) if profile else None
        trainer = train.build_trainer(cfg, model, tokenizer, data.train, [], device,
                                      (clock, profiler.callback) if profiler else (clock,),
                                      cuda_graphs=layer_graphs.graphs_training(model))
        gc.collect()  # the full-precision weights a quantised base was made from must not count in its peak
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        output = trainer.train()
        timed = clock.marks[:last_timed]
        (t0, n0), (t1, n1) = timed[warm - 1], timed[-1]
        step_s = (t1 - t0) / (len(timed) - warm)
        tokens_per_s = (n1 - n0) / (t1 - t0)
        nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        row = dict(variant=name, overrides=overrides, config=Path(args.model_config).name,
                   device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   # From the variant's start to its first step: tokenizing, building the model and Trainer.
                   setup_s=round(clock.began - variant_started, 1), baseline_gib=baseline_gib,
                   # The untimed first steps, from train() on: compiling happens here.
                   init_s=round(init_s, 1), warmup_s=round(t0 - clock.began, 1), warmup_steps=warm,
                   steps=len(clock.marks), step_s=round(step_s, 4),
                   # Under CUDA graphs a step of a new length runs eagerly, the next one records: the median
                   # says what a step costs once the lengths recur, the mean what these steps cost. (Measured
                   # on the host, which runs at most a step ahead of the GPU: the guard reads the verdict on
                   # the step before.)
                   step_s_median=round(statistics.median(b - a for (a, _), (b, _) in zip(timed[warm - 1:], timed[warm:])),
                                       4),
                   real_tokens_per_s=round(tokens_per_s), est_3epoch_min=round(3 * -(-3729 // 16) * step_s / 60, 2),
                   useful_tflops=round(FLOP_PER_TOKEN_FACTOR * nonembed * tokens_per_s / 1e12, 1),
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   # What the caching allocator held at most: the figure a card of a given size must fit
                   # (with the CUDA context besides); allocated is what the peer reports.
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                   estimated_peak_gib=round(decision.estimate.peak / memory.GiB, 2),
                   gradient_checkpointing=decision.checkpointing, attention=attention.active(model),
                   checkpointed_layers=decision.layers, cuda_graphs=layer_graphs.summary(model),
                   final_loss=output.training_loss, first_losses=[round(x, 4) for x in losses[:LOGGED_STEPS]])
        if profiler:
            row["profile"] = profiler.summary()
    return row


def tokenized(cfg) -> tuple:
    """(the tokenizer, train.build_dataset's data) for `cfg`, made once per launch for each tokenizer and data
    setting: the variants of a launch differ in how they train, not in what they read, and tokenizing the
    3,729 rows again (with the tokenizer loaded again) took 4-5 s of each variant's setup on the 2-core CPU."""
    from roletune import train
    from roletune.model import load_tokenizer

    key = (cfg.model.tokenizer or cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code, repr(cfg.data),
           cfg.train.seed)
    if key not in TOKENIZED:
        tokenizer = load_tokenizer(cfg.model)
        TOKENIZED[key] = tokenizer, train.build_dataset(cfg, tokenizer)
    return TOKENIZED[key]


def random_base(model_cfg, where, dtype):
    """Stands in for roletune.model.load_base_model: the base's weights drawn from its config instead of read
    from a checkpoint (none is on this machine), and quantised as they would be read, for model.quantization."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from roletune.model import quantization_config

    config = AutoConfig.from_pretrained(model_cfg.path)
    with where:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model_cfg.quantization == "none":
        return model
    # bitsandbytes quantises weights while from_pretrained loads them: hand it the random ones.
    quantised = type(model).from_pretrained(
        None, config=config, state_dict=model.state_dict(), dtype=dtype, device_map={"": str(where)},
        quantization_config=quantization_config(model_cfg, dtype))
    quantised.name_or_path = model_cfg.path  # as from_pretrained(path) would name it: peft reads it
    return quantised


class StepProfiler:
    """torch.profiler over the run's last steps, from `first_step` on: how long a step takes, how much of
    it the GPU spends in kernels, and how many kernels and operators it launches. A GPU busy far less
    than the wall time means the step is bound by launching work from Python (where torch.compile or
    CUDA graphs pay), not by the GPU's arithmetic. On a GPU it also lists the calls that made the host wait
    for the GPU in those steps (torch.cuda.set_sync_debug_mode), by file and line."""

    def __init__(self, first_step: int, cuda: bool):
        from transformers import TrainerCallback

        self.first_step, self.cuda = first_step, cuda
        self.profile, self.started, self.wall, self.steps, self.error = None, 0.0, 0.0, 0, None
        self.warnings, self.waits = None, []
        outer = self

        # A profiler that cannot start (no CUPTI, say) must not cost the run its timing: its error is reported.
        class Hooks(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == outer.first_step:
                    outer.guarded(outer.start)

            def on_step_end(self, args, state, control, **kwargs):
                if outer.profile is not None and state.global_step == state.max_steps:
                    outer.guarded(outer.stop, state.global_step - outer.first_step + 1)

        self.callback = Hooks()

    def guarded(self, action, *args):
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the row instead
            self.error, self.profile = f"{type(exc).__name__}: {exc}", None

    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            torch.cuda.synchronize()
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.__enter__()
        if self.cuda:  # and every call that makes the host wait for the GPU, with the line that made it
            self.warnings = warnings.catch_warnings(record=True)
            self.waits = self.warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.started = time.time()

    def stop(self, steps: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self.warnings.__exit__(None, None, None)
            torch.cuda.synchronize()
        self.wall, self.steps = time.time() - self.started, steps
        self.profile.__exit__(None, None, None)

    def summary(self) -> dict:
        if self.profile is None:
            return {"error": self.error or "the profiled steps were not reached"}
        return self.guarded(self.figures) or {"error": self.error}

    def figures(self) -> dict:
        from torch.autograd import DeviceType

        averages = self.profile.key_averages()
        kernels = [a for a in averages if a.device_type == DeviceType.CUDA]
        busy_s = sum(a.self_device_time_total for a in kernels) / 1e6
        operators = sum(a.count for a in averages if a.key.startswith("aten::"))
        per_step = max(self.steps, 1)
        return {"steps": self.steps, "wall_ms_per_step": round(1000 * self.wall / per_step, 1),
                "gpu_busy_ms_per_step": round(1000 * busy_s / per_step, 1) if self.cuda else None,
                "gpu_busy_fraction": round(busy_s / self.wall, 3) if self.cuda and self.wall else None,
                "kernels_per_step": round(sum(a.count for a in kernels) / per_step) if self.cuda else None,
                "aten_calls_per_step": round(operators / per_step),
                # Where the host waited for the GPU in these steps (none between logs is the aim).
                "gpu_waits": dict(collections.Counter(
                    f"{Path(w.filename).name}:{w.lineno}" for w in self.waits if "synchroniz" in str(w.message))),
                # Which operators are called most: where launches (and so host time) could be saved.
                "top_aten_calls_per_step": {a.key: round(a.count / per_step) for a in sorted(
                    (a for a in averages if a.key.startswith("aten::")), key=lambda a: -a.count)[:TOP_OPERATORS]},
                **(kernel_time(kernels, per_step) if self.cuda else {})}


def kernel_time(kernels: list, per_step: int) -> dict:
    """Where the GPU's busy time goes: the kernels that take most of it (ms a step, calls a step), and what the
    short ones add up to. Many kernels of a few microseconds each are work that fusing them (Liger's kernels,
    torch.compile) would save even once the host launches nothing (CUDA graphs)."""
    def ms(events) -> float:
        return round(sum(a.self_device_time_total for a in events) / 1000 / per_step, 1)

    short = [a for a in kernels if a.count and a.self_device_time_total / a.count < SHORT_KERNEL_US]
    return {"top_kernels_ms_per_step": {a.key[:90]: [ms([a]), round(a.count / per_step)] for a in sorted(
                kernels, key=lambda a: -a.self_device_time_total)[:TOP_OPERATORS]},
            f"kernels_under_{SHORT_KERNEL_US}us": {"per_step": round(sum(a.count for a in short) / per_step),
                                                   "ms_per_step": ms(short)}}


def report(rows: list[dict]) -> None:
    columns = ["variant", "step_s", "real_tokens_per_s", "useful_tflops", "peak_mem_gib", "est_3epoch_min",
               "final_loss", "warmup_s"]
    print("\n" + " | ".join(f"{c:>17}" for c in columns))
    for row in rows:
        print(" | ".join(f"{str(row.get(c)):>17}" for c in columns))
    by_name = {row["variant"]: row for row in rows}
    for name, row in by_name.items():
        if row.get("profile"):
            print(f"{name} profile: {row['profile']}")
    if "roletune" not in by_name:
        return  # nothing to compare with
    ours = by_name["roletune"]
    print(f"\nroletune first losses: {ours.get('first_losses')}; device: {ours['device']}, torch {ours['torch']}")
    for name, row in by_name.items():
        if name not in ("roletune", "seed", "bs16"):
            print(f"{name}: {row['step_s'] / ours['step_s']:.2f}x roletune's step time")
    for name, row in by_name.items():
        if row.get("peak_reserved_gib") is not None:
            print(f"{name}: peak {row['peak_mem_gib']} GiB allocated, {row['peak_reserved_gib']} GiB reserved, "
                  f"{row['estimated_peak_gib']} GiB estimated")
    for peer in ("bs16", "seed"):
        if peer in by_name:
            print(f"speedup_vs_{peer}={by_name[peer]['step_s'] / ours['step_s']:.2f}")


if __name__ == "__main__":
    main()
