"""Several processes, one run: what roletune adds when launched by torchrun or accelerate launch.

Trainer (through accelerate) does the distributed work itself: it reads RANK, LOCAL_RANK and
WORLD_SIZE, wraps the model in DDP (or FSDP, or DeepSpeed), deals the batches of one seeded
sampler out to the ranks and divides the loss by every rank's trained tokens. This module
decides the rest: each rank's device, the arguments for `train.distributed` and
`train.effective_batch`, an epoch end without repeated examples, which rank reports an
error, and `roletune train --nproc N`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roletune.errors import ConfigError
from roletune.tokenize import IGNORE_INDEX

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
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=grad_accum(t, launch.world_size)))


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


class EvenTailTrainer:
    """Trainer mixin: a distributed epoch ends without repeated examples.

    accelerate deals the seeded permutation out to the ranks one micro-batch each, round by round.
    When the examples do not fill the last round it starts over from the first examples
    (`even_batches`), so a few train twice. Here the permutation is padded instead with a filler
    whose labels are all ignored: the ranks stay in step, the filler adds nothing to the loss or to
    the token count it is divided by, and every optimizer step holds exactly the examples that a
    single process with the same effective batch puts in it.
    """

    def get_train_dataloader(self):
        if self.args.world_size <= 1 or self.args.train_sampling_strategy != "random":
            return super().get_train_dataloader()
        dataset = WithFiller(self.train_dataset)
        multiple = self.args.per_device_train_batch_size * self.args.world_size

        def padded_order(data: WithFiller) -> PaddedOrder:
            data.order = self._seeded_order(data)
            return PaddedOrder(data.order, multiple, len(data))

        return self._get_dataloader(dataset=dataset, description="Training", batch_size=self._train_batch_size,
                                    sampler_fn=padded_order, is_training=True)

    def get_eval_dataloader(self, eval_dataset=None):
        """Held-out rows in order, padded with fillers too: accelerate would repeat the first rows to even
        out the ranks, and they would count twice in the eval loss."""
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.args.world_size <= 1 or not isinstance(rows, list):
            return super().get_eval_dataloader(eval_dataset)
        multiple = self.args.per_device_eval_batch_size * self.args.world_size
        return self._get_dataloader(dataset=WithFiller(rows), description="Evaluation",
                                    batch_size=self.args.eval_batch_size,
                                    sampler_fn=lambda data: PaddedOrder(range(len(rows)), multiple, len(rows)))

    def _seeded_order(self, dataset):
        return seeded_order(dataset, self.args.data_seed if self.args.data_seed is not None else self.args.seed)


def seeded_order(dataset, seed: int):
    """The sampler accelerate puts in place of Trainer's RandomSampler in a single process, with the same seed:
    a permutation drawn from seed + epoch (set_epoch) for each epoch."""
    from accelerate.data_loader import SeedableRandomSampler

    return SeedableRandomSampler(dataset, data_seed=seed)


def training_order(count: int, batch_size: int, world_size: int, seed: int, grad_accum: int, epochs: float,
                   max_steps: int | None):
    """Every micro-batch of a run, over all processes, as lists of example indices (`count` is the filler
    of a distributed tail); None when Trainer orders the examples some other way than modelled here.

    In one process Trainer trains on `seeded_order` in micro-batches of `batch_size` consecutive indices,
    the last one shorter. In W processes EvenTailTrainer pads the permutation to whole rounds and accelerate
    deals it round by round, one micro-batch to each rank. An epoch is ceil(micro-batches per rank /
    grad_accum) optimizer steps; the run is max_steps of them, or epochs x that, and the last step takes
    its grad_accum micro-batches whole. Written out here, not read from a Trainer, because memory.for_run
    needs it before the model (and so any Trainer) exists; tests compare it with a real Trainer's batches.
    """
    from transformers import TrainingArguments

    # train_sampling_strategy stays at Trainer's default in roletune (and EvenTailTrainer pads only that one).
    if getattr(TrainingArguments, "train_sampling_strategy", None) != "random":
        return None
    per_round = batch_size * world_size
    padded = count + (-count % per_round if world_size > 1 else 0)
    per_rank = math.ceil(padded / per_round)
    steps_per_epoch = max(math.ceil(per_rank / grad_accum), 1)
    steps = max_steps or math.ceil(epochs * steps_per_epoch)
    order = seeded_order(range(count), seed)
    batches = []
    for epoch in range(math.ceil(steps / steps_per_epoch)):
        order.set_epoch(epoch)
        indices = [*order, *[count] * (padded - count)]
        epoch_steps = min(steps_per_epoch, steps - epoch * steps_per_epoch)
        used = min(per_rank, epoch_steps * grad_accum) * world_size
        batches += [indices[start:start + batch_size] for start in range(0, used * batch_size, batch_size)]
    return batches


def with_even_tail(trainer_class: type) -> type:
    return type(f"EvenTail{trainer_class.__name__}", (EvenTailTrainer, trainer_class), {})


class WithFiller:
    """The training features; index len(features) is a filler: one token, no label."""

    def __init__(self, features: list[dict]):
        self.features = features
        self.filler = {**{key: value[:1] for key, value in features[0].items()}, "labels": [IGNORE_INDEX]}
        self.order = None  # the seeded sampler that orders these features

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the order. accelerate looks for a sampler's set_epoch two wrappers deep;
        a resumed epoch has three (skipped batches, this rank's shard, batches) and there it falls back
        to the dataset's set_epoch. Without this, a run resumed mid-epoch re-shuffles as epoch 0."""
        if self.order is not None:
            self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.filler if index == len(self.features) else self.features[index]


class PaddedOrder:
    """A sampler's order followed by `filler` indices up to a multiple of `multiple`."""

    def __init__(self, order, multiple: int, filler: int):
        self.order, self.multiple, self.filler = order, multiple, filler

    def __len__(self) -> int:
        return len(self.order) + -len(self.order) % self.multiple

    def __iter__(self):
        yield from self.order
        yield from [self.filler] * (-len(self.order) % self.multiple)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.order, "set_epoch"):  # the epoch seeds the permutation, the same on every rank
            self.order.set_epoch(epoch)


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
