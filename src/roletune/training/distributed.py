"""Several processes, one run: what roletune adds when launched by torchrun or accelerate launch.

Trainer (through accelerate) does the distributed work itself: it reads RANK, LOCAL_RANK and
WORLD_SIZE, wraps the model in DDP (or FSDP, or DeepSpeed), deals the batches of one seeded
sampler out to the ranks and divides the loss by every rank's trained tokens. This module
decides the rest: each rank's device, the arguments for `train.distributed` and
`train.effective_batch`, which rank reports an error, and `roletune train --nproc N`. Which
examples each rank trains on is roletune.training.epoch_order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roletune.errors import ConfigError

# torch is imported where it is used: the CLI asks first_to_report() on every error, torch or not.
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Launch:
    """This process's place in the job; the defaults are a plain single-process run."""
    launched: bool = False  # started by torchrun / accelerate launch (LOCAL_RANK is set)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Launch:
    env = os.environ
    if "LOCAL_RANK" not in env:
        return Launch()
    world = int(env.get("WORLD_SIZE", 1))
    return Launch(True, int(env.get("RANK", 0)), int(env["LOCAL_RANK"]), world,
                  int(env.get("LOCAL_WORLD_SIZE", world)))


def device_for(spec: str, launch: Launch) -> torch.device:
    """`model.device` for this process: in a launch, rank r of a machine trains on cuda:r (or the CPU)."""
    import torch

    from roletune.model import resolve_device

    if not launch.launched:
        return resolve_device(spec)
    if spec.startswith("cuda:"):
        raise ConfigError(f"model.device={spec} names one GPU, but this is a distributed launch where each process "
                          "trains on cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES and set "
                          "model.device=auto (or cuda)")
    device = resolve_device(spec)
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count()
    if launch.local_world_size > count:
        raise ConfigError(f"{launch.local_world_size} processes on this machine but {count} GPU(s) visible; "
                          "start at most one process per GPU (--nproc / --nproc-per-node) or widen CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", launch.local_rank)


def resolve(cfg, launch: Launch, device: torch.device):
    """Check `train.distributed` against the launch and derive grad_accum from `train.effective_batch`."""
    t = cfg.train
    if t.distributed == "fsdp" and launch.world_size < 2:
        raise ConfigError("train.distributed=fsdp shards the base model across processes, but this is one process; "
                          "launch with --nproc N, torchrun or accelerate launch")
    if t.distributed == "fsdp" and device.type != "cuda":
        raise ConfigError("train.distributed=fsdp needs GPUs: accelerate trains CPU processes with DDP only; "
                          "use train.distributed=ddp on CPUs")
    if t.distributed == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.distributed=deepspeed: the deepspeed package is not installed (pip install deepspeed)")
        if not Path(t.deepspeed).is_file():
            raise ConfigError(f"train.deepspeed={t.deepspeed}: no such DeepSpeed config file")
    from roletune.training.batching import CUDA_GRAPH_MODES

    accumulated = grad_accum(t, launch.world_size)
    if accumulated > 1 and t.compile and t.compile_mode in CUDA_GRAPH_MODES:
        # A gradient AccumulateGrad keeps from one micro-batch is memory the graphs reuse for the next one.
        raise ConfigError(f"train.compile_mode={t.compile_mode} replays CUDA graphs, which reuse their memory from "
                          f"one micro-batch to the next: train with one micro-batch per optimizer step "
                          f"(train.grad_accum=1 and a larger train.batch_size), not {accumulated}")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accumulated))


def grad_accum(t, world_size: int) -> int:
    """Micro-batches per optimizer step, so that batch_size x grad_accum x processes = effective_batch."""
    if t.effective_batch is None:
        return t.grad_accum
    per_round = t.batch_size * world_size
    if t.effective_batch % per_round:
        raise ConfigError(f"train.effective_batch={t.effective_batch} is not a multiple of train.batch_size x "
                          f"processes = {t.batch_size} x {world_size} = {per_round}; change either")
    return t.effective_batch // per_round


def load_device(cfg, device: torch.device) -> torch.device:
    """Sharded runs load the base into CPU memory; FSDP / DeepSpeed put each rank's shard on its GPU."""
    import torch

    return torch.device("cpu") if cfg.train.distributed in ("fsdp", "deepspeed") else device


def sharded(cfg) -> bool:
    """Whether every rank must join each forward pass (the weights are spread over the ranks)."""
    return cfg.train.distributed in ("fsdp", "deepspeed")


def trainer_arguments(cfg, device: torch.device) -> dict:
    """The TrainingArguments a launch needs; a single process ignores them."""
    t = cfg.train
    several = current().world_size > 1  # (a backend named in a single process makes accelerate look for a group)
    args = {"ddp_backend": "gloo" if several and device.type == "cpu" else None,  # NCCL on GPUs
            "ddp_find_unused_parameters": False}  # every LoRA weight takes part in every forward
    if t.distributed == "fsdp":
        # FSDP2, one shard unit per decoder layer (the model's _no_split_modules); the adapter is
        # gathered whole on rank 0 when saved.
        args.update(fsdp=True, fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "state_dict_type": "FULL_STATE_DICT"})
    elif t.distributed == "deepspeed":
        args["deepspeed"] = t.deepspeed
    return args


def first_to_report(message: str) -> bool:
    """Whether this process should print `message`: once per launch and machine.

    Every rank reads the same config and data, so a bad override fails on all of them at once;
    it is shown once. A failure of one rank alone (its GPU, say) is still shown.
    """
    launch = current()
    if not launch.launched or launch.world_size == 1:
        return True
    # The ranks of one machine share their launcher (torchrun's agent) as parent process.
    digest = hashlib.sha1(f"{os.getppid()}\n{message}".encode()).hexdigest()[:16]
    try:
        (Path(tempfile.gettempdir()) / f"roletune-reported-{digest}").touch(exist_ok=False)
    except FileExistsError:
        return False
    except OSError:
        pass
    return True


def relaunch(nproc: int, argv: list[str]) -> int:
    """`roletune train ... --nproc N`: the same command under torchrun's launcher, on this machine."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if current().launched:
        raise ConfigError("--nproc starts torchrun itself; inside torchrun or accelerate launch leave it out")
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: expected a number of processes >= 1")
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "roletune", *argv]))
    except ChildFailedError as exc:  # the failed rank has said why; torchrun has stopped the others
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # Ctrl-C or SIGTERM: torchrun has passed it on to its processes
        return 128 + int(exc.sigval)
    return 0


def quiet():
    """For ranks other than 0: no progress bars, and an echo that prints nothing."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    return lambda *args, **kwargs: None
