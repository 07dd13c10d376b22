"""Which examples each micro-batch holds, in one process or several.

Trainer draws a seeded permutation of the examples every epoch (seed + epoch) and cuts it into
micro-batches; under several processes accelerate deals those out to the ranks, one each, round by
round. roletune keeps that order and changes one thing: an epoch whose examples do not fill the
last round is completed by a filler without labels instead of repeated examples (EvenTail).
`training_order` writes the whole run's micro-batches out in advance, for the memory estimate.
"""
from __future__ import annotations

import math

from roletune.data.tokenize import IGNORE_INDEX


class EvenTail:
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
    the last one shorter. In W processes EvenTail pads the permutation to whole rounds and accelerate
    deals it round by round, one micro-batch to each rank. An epoch is ceil(micro-batches per rank /
    grad_accum) optimizer steps; the run is max_steps of them, or epochs x that, and the last step takes
    its grad_accum micro-batches whole. Written out here, not read from a Trainer, because memory.for_run
    needs it before the model (and so any Trainer) exists; tests compare it with a real Trainer's batches.
    """
    from transformers import TrainingArguments

    # train_sampling_strategy stays at Trainer's default in roletune (and EvenTail pads only that one).
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
