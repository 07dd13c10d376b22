"""Several processes: two CPU ranks (gloo) train the adapter one process trains, and only rank 0 writes.

Run as a script under torchrun (`--fsdp-worker`, `--nan-worker`), this file is also the worker of the FSDP
and the non-finite checks.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from roletune import train
from roletune.cli import main
from roletune.config import load_config
from roletune.errors import ConfigError
from roletune.training import distributed, epoch_order

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240
# Three rows are held out; the ten trained do not fill the last round of 2 ranks x 2 examples, and
# the three held out do not fill one eval round: both tails are exercised.
ROWS = [{"instruction": f"第{i}个问题：今天海上风大吗？", "output": f"风有{i}级，灯塔照常亮着。" + "浪很高。" * (i % 3)}
        for i in range(13)]
PROMPTS = ["你是谁？", "灯塔还亮着吗？"]


def write_config(folder: Path, tiny_model: Path, **train_settings) -> Path:
    (folder / "rows.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model), "device": "cpu"},
           "data": {"path": str(folder / "rows.json"), "system_prompt": "你是守灯人林小满。", "max_length": 64,
                    "eval_size": 3},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 2, "lr": 5.0e-3, "logging_steps": 1, "save_steps": 2, "seed": 7,
                     "report_to": "none", **train_settings},
           "eval": {"sample_prompts": PROMPTS, "max_new_tokens": 8},
           "output_dir": str(folder / "run")}
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def launch_env(home: Path) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("SWANLAB_API_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, home: Path) -> subprocess.CompletedProcess:
    """Two local processes; --standalone rendezvous picks a free port."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=ROOT, env=launch_env(home))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model):
    """The same effective batch (4 examples x 2 micro-batches = 8) as 2 ranks x 2 examples and as
    1 process x 4 examples; the two-rank run is started by `roletune train --nproc 2`, with SwanLab."""
    two = tmp_path_factory.mktemp("two")
    config = write_config(two, tiny_model, batch_size=2, effective_batch=8, report_to="swanlab", save_steps=1)
    started = subprocess.run([sys.executable, "-m", "roletune", "train", str(config), "--nproc", "2"],
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=ROOT,
                             env=launch_env(tmp_path_factory.mktemp("home")))
    assert started.returncode == 0, started.stderr[-3000:]
    one = tmp_path_factory.mktemp("one")
    single = train.run(load_config(write_config(one, tiny_model, batch_size=4, grad_accum=2)), echo=lambda *_: None)
    return two / "run", Path(single.output_dir), started


@pytest.mark.slow
@pytest.mark.ranks
def test_two_ranks_train_the_adapter_one_process_trains(two_runs):
    two, one, _ = two_runs
    got, want = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    # Measured: max |difference| 1.6e-6 on weights up to 0.13 (float32 sums in another order).
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(w, torch.zeros_like(w)) for name, w in want.items() if "lora_B" in name)  # trained
    losses = [[(e["step"], e["loss"]) for e in json.loads((run / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for run in (two, one)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2, 3, 4]  # ceil(10 / 8) = 2 steps an epoch
    assert [v for _, v in losses[0]] == pytest.approx([v for _, v in losses[1]], abs=1e-5)
    assert yaml.safe_load((two / "roletune.yaml").read_text())["train"]["grad_accum"] == 2  # derived, and recorded
    evals = [[(e["step"], e["eval_loss"]) for e in json.loads((run / "trainer_state.json").read_text())["log_history"]
              if "eval_loss" in e] for run in (two, one)]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [2, 4]
    # Each held-out token counted once (no row repeated to even out the ranks): the single-process figure.
    assert [v for _, v in evals[0]] == pytest.approx([v for _, v in evals[1]], abs=1e-5)


@pytest.mark.slow
@pytest.mark.ranks
def test_two_ranks_resumed_mid_epoch_end_as_if_never_stopped(two_runs, tmp_path):
    """Resumed from checkpoint-3, half-way through the second epoch: that epoch's order must be its own."""
    two, _, _ = two_runs
    resumed = tmp_path / "run"
    shutil.copytree(two / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(two / "roletune.yaml", resumed)
    done = subprocess.run([sys.executable, "-m", "roletune", "train", str(two.parent / "c.yaml"), "--nproc", "2",
                           "--resume", f"output_dir={resumed}"], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, cwd=ROOT, env=launch_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = load_file(resumed / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    last = [[e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"]
             if e.get("step") == 4 and "loss" in e] for run in (resumed, two)]
    assert last[0] == pytest.approx(last[1], abs=1e-6) and last[0]


@pytest.mark.slow
@pytest.mark.ranks
def test_only_rank_0_writes_and_speaks(two_runs):
    two, _, started = two_runs
    swanlog = two / "swanlog"
    assert len(list(swanlog.glob("run-*"))) == 1  # one tracker run
    assert len(list(two.glob("adapter_model.safetensors"))) == 1
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["epoch"], r["prompt"]) for r in samples] == [(e, p) for e in (0, 1, 2) for p in PROMPTS]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["optimizer_steps"] == 4
    assert summary["grad_accum"] == 2  # decided from train.effective_batch=8 on 2 ranks of 2 examples
    assert (two / "checkpoint-2" / "roletune.yaml").is_file()
    assert started.stdout.count("trainable params: ") == 1
    assert started.stdout.count("first example, trained tokens") == 1


def test_a_bad_override_fails_every_rank_and_is_said_once(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, batch_size=2)
    done = torchrun("-m", "roletune", "train", str(config), "train.lr=fast", home=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("roletune: error: ") == 1, done.stderr
    assert "train.lr='fast': expected a number" in done.stderr
    assert not (tmp_path / "run").exists()


def test_nproc_is_refused_inside_a_launch_and_below_one(config_file, monkeypatch, capsys):
    assert main(["train", str(config_file()), "--nproc", "0"]) == 1
    assert "--nproc 0: expected a number of processes >= 1" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", str(config_file()), "--nproc", "2"]) == 1
    assert "--nproc starts torchrun itself" in capsys.readouterr().err


def in_launch(rank: int = 1, world: int = 2) -> distributed.Launch:
    return distributed.Launch(True, rank, rank, world, world)


def test_each_rank_picks_its_own_device():
    assert distributed.device_for("cpu", in_launch()) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.device_for("auto", in_launch()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device=cuda:1 names one GPU.*CUDA_VISIBLE_DEVICES"):
        distributed.device_for("cuda:1", in_launch())


def test_effective_batch_sets_grad_accum_from_the_world_size(config_file):
    cfg = load_config(config_file(train={"batch_size": 2, "effective_batch": 16}))
    cpu = torch.device("cpu")
    assert distributed.resolve(cfg, distributed.Launch(), cpu).train.grad_accum == 8
    assert distributed.resolve(cfg, in_launch(world=4), cpu).train.grad_accum == 2
    with pytest.raises(ConfigError, match=r"effective_batch=16 is not a multiple of .* 2 x 3 = 6"):
        distributed.resolve(cfg, in_launch(world=3), cpu)


def test_cuda_graphs_take_one_micro_batch_per_step(config_file):
    graphs = {"compile": "layers", "compile_mode": "reduce-overhead", "batch_size": 4}
    cpu = torch.device("cpu")
    assert distributed.resolve(load_config(config_file(train={**graphs, "grad_accum": 1})), distributed.Launch(),
                               cpu).train.grad_accum == 1
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead replays CUDA graphs.*grad_accum=1.*not 4"):
        distributed.resolve(load_config(config_file(train={**graphs, "effective_batch": 16})), distributed.Launch(), cpu)


def test_a_tail_round_is_padded_not_repeated():
    """accelerate's own shards of the padded order: every example once, each round one single-process batch."""
    from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
    from torch.utils.data import BatchSampler

    def order(examples):  # what each rank (and the single process) builds for itself
        return SeedableRandomSampler(range(examples), data_seed=3)

    for examples, per_device, ranks in [(10, 2, 2), (12, 2, 2), (7, 2, 3), (5, 4, 2)]:
        shards = [list(BatchSamplerShard(BatchSampler(epoch_order.PaddedOrder(order(examples), per_device * ranks,
                                                                              filler=examples), per_device, False),
                                         ranks, rank)) for rank in range(ranks)]
        rounds = [sum((shard[i] for shard in shards), []) for i in range(len(shards[0]))]
        assert [[i for i in r if i != examples] for r in rounds] == list(BatchSampler(order(examples),
                                                                                      per_device * ranks, False))


def test_fsdp_arguments_and_where_fsdp_cannot_run(config_file):
    from roletune.training.trainer import training_arguments

    cfg = load_config(config_file(train={"distributed": "fsdp"}))
    args = training_arguments(cfg, torch.device("cpu"))
    assert args.fsdp_plugin_args == {**args.fsdp_plugin_args, "fsdp_version": 2,
                                     "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}
    with pytest.raises(ConfigError, match="fsdp shards the base model across processes, but this is one process"):
        distributed.resolve(cfg, distributed.Launch(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="fsdp needs GPUs"):
        distributed.resolve(cfg, in_launch(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="deepspeed and train.deepspeed"):
        load_config(config_file(train={"distributed": "deepspeed"}))


@pytest.mark.slow
@pytest.mark.ranks
def test_fsdp2_shards_the_base_and_trains_the_adapter_on_two_cpu_ranks(tmp_path, tiny_model):
    """accelerate routes CPU processes to DDP, so this hands accelerate's own FSDP2 preparation the plugin
    roletune configures for GPUs, and checks sharding, LoRA gradients and the gathered adapter."""
    config = write_config(tmp_path, tiny_model, batch_size=2)
    done = torchrun(__file__, "--fsdp-worker", str(config), str(tmp_path / "fsdp.json"), home=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["wrapped"].count("FSDPQwen2DecoderLayer") == 2
    assert report["frozen_local_share"] == pytest.approx(0.5, abs=0.01)  # each rank holds half the base
    assert report["adapter_tensors"] > 0 and report["max_adapter_change"] > 1e-3  # the adapter did move
    assert report["max_adapter_diff"] < 1e-5  # measured: about 2e-7


def fsdp_worker(config_path: str, report_path: str) -> None:
    """Under torchrun: two AdamW steps on a batch of 4, sharded 2 + 2 under FSDP2, against an unsharded replica."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    from roletune.model import load_tokenizer
    from roletune.training.batching import make_collator, reply_token_loss
    from roletune.training.trainer import training_arguments

    cfg = load_config(config_path, ["train.distributed=fsdp"])
    cpu = torch.device("cpu")
    plugin = FullyShardedDataParallelPlugin(**training_arguments(cfg, cpu).fsdp_plugin_args)  # (resets accelerate)
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = plugin
    quiet = distributed.quiet()
    replica = train.build_model(cfg, cpu, quiet)
    sharded = fsdp2_prepare_model(accelerator, train.build_model(cfg, cpu, quiet))  # same seed: same LoRA init
    rank, world = accelerator.process_index, accelerator.num_processes

    tokenizer = load_tokenizer(cfg.model)
    examples = [e.as_features() for e in train.build_dataset(cfg, tokenizer).train[:4]]
    collate = make_collator(tokenizer, packing=False)
    whole, mine = collate(examples), collate(examples[2 * rank:2 * rank + 2])
    tokens = (whole["labels"][:, 1:] != -100).sum()  # the step's trained tokens, over both ranks
    initial = {n: p.detach().clone() for n, p in replica.named_parameters() if p.requires_grad}
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (replica, sharded)]
    for _ in range(2):
        for model, batch, scale, optimizer in [(replica, whole, 1, optimizers[0]), (sharded, mine, world, optimizers[1])]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss, _ = reply_token_loss(model, inputs, batch["labels"], tokens)
            (loss * scale).backward()  # FSDP averages gradients over ranks, as DDP does
            optimizer.step()
            optimizer.zero_grad()

    frozen = [p for p in sharded.parameters() if not p.requires_grad]
    share = sum(p.to_local().numel() for p in frozen) / sum(p.numel() for p in frozen)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    expected = {n: p for n, p in replica.named_parameters() if p.requires_grad}
    if rank == 0:
        Path(report_path).write_text(json.dumps({
            "wrapped": [type(m).__name__ for m in sharded.modules() if isinstance(m, FSDPModule)],
            "frozen_local_share": share, "adapter_tensors": len(expected),
            "max_adapter_change": max((p.detach() - initial[n]).abs().max().item() for n, p in expected.items()),
            "max_adapter_diff": max((full[n] - p.detach()).abs().max().item() for n, p in expected.items())}))


@pytest.mark.slow
@pytest.mark.ranks
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_on_one_rank_stops_or_skips_the_same_step_on_every_rank(tmp_path, tiny_model, policy):
    """NaN activations on rank 1 only, in step 3 of 5, with no log or checkpoint to read the verdict sooner:
    each rank makes the check on its device and or-s it over the ranks there, so both stop naming step 3
    (stop) or both skip its update and go on with the same adapter (skip)."""
    config = write_config(tmp_path, tiny_model, batch_size=2)
    done = torchrun(__file__, "--nan-worker", str(config), str(tmp_path / "rank"), policy, home=tmp_path)
    reports = [json.loads((tmp_path / f"rank.{rank}").read_text()) for rank in (0, 1)]
    if policy == "stop":
        assert done.returncode != 0
        assert all(r["error"].startswith("step 3: the gradient norm is nan") for r in reports), reports
        assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(r["error"] is None and r["finite"] for r in reports), reports
    assert reports[0]["adapter"] == reports[1]["adapter"]  # the ranks still hold the same weights
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["skipped_steps"] == [3] and summary["optimizer_steps"] == 5


def nan_worker(config_path: str, report_prefix: str, policy: str) -> None:
    """Under torchrun: a run of 5 steps whose step 3 is NaN on rank 1 only; each rank reports its outcome."""
    from transformers import TrainerCallback

    from roletune.errors import NonFiniteError

    rank = distributed.current().rank

    class PoisonOnRank1(TrainerCallback):
        hook, model = None, None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            if state.global_step + 1 == 3 and rank == 1:
                self.hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))

        def on_step_end(self, args, state, control, **kwargs):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None

    cfg = load_config(config_path, [f"train.on_nonfinite={policy}", "train.max_steps=5", "train.logging_steps=100",
                                    "train.save_steps=100"])
    poison, error = PoisonOnRank1(), None
    try:
        train.run(cfg, callbacks=(poison,), echo=lambda *_: None)
    except NonFiniteError as exc:
        error = str(exc)
    adapter = [p.detach() for p in poison.model.parameters() if p.requires_grad]
    Path(f"{report_prefix}.{rank}").write_text(json.dumps({
        "error": error, "finite": all(bool(torch.isfinite(p).all()) for p in adapter),
        "adapter": [round(float(p.double().sum()), 12) for p in adapter]}))
    if error:
        sys.exit(1)


if __name__ == "__main__" and sys.argv[1:2] == ["--fsdp-worker"]:
    fsdp_worker(*sys.argv[2:4])
if __name__ == "__main__" and sys.argv[1:2] == ["--nan-worker"]:
    nan_worker(*sys.argv[2:5])
