"""The LM head and its cross-entropy without the whole logits matrix at once.

Qwen2.5's head has 152k columns: the logits of a micro-batch of 16 x 1024 tokens (even only at
the trained positions) are a few GB in bf16, again in fp32 for the loss, and again as their
gradient. Two ways around that, both fed the final hidden states of the trained positions:

- liger: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only) computes the head, the
  loss and its gradient chunk by chunk in one pass. Used when the package is installed. It counts
  the trained tokens on the GPU and reads the count back (0.8.5: `target_mask.sum().item()`), so the
  host waits there for the forward to finish before it queues the backward.
- chunked: plain PyTorch. The positions are cut into chunks of `rows`; each chunk's head + loss
  runs under non-reentrant activation checkpointing, so its logits are freed right after the
  forward and recomputed one chunk at a time in the backward. Costs one extra head matmul.

transformers' own `use_liger_kernel` instead patches the model's forward to take the labels and
run the fused loss over every position; here the head runs only at trained positions.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from roletune.data.tokenize import IGNORE_INDEX
from roletune.errors import brief

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkedCrossEntropy:
    """Summed cross-entropy of `lm_head(hidden)` against `targets`, `rows` positions at a time."""

    rows: int = 1024

    def __call__(self, hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
        if len(hidden) <= self.rows:
            # One chunk: its logits would be recomputed right where the backward starts, at the same peak;
            # skip the recompute (the usual case for short role-play micro-batches).
            return _head_loss(hidden, lm_head.weight, lm_head.bias, targets)
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows, row_targets in zip(hidden.split(self.rows), targets.split(self.rows)):
            # The weight goes in as an argument (not read inside) so the recompute sees the same tensor.
            total = total + checkpoint(_head_loss, rows, lm_head.weight, lm_head.bias, row_targets,
                                       use_reentrant=False)
        return total


def _head_loss(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()  # fp32 loss, as on the full-logits path
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class LigerCrossEntropy:
    """Summed cross-entropy of `lm_head(hidden)` by Liger-Kernel's fused kernel (CUDA only)."""

    def __init__(self):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self.fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def __call__(self, hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
        return self.fused(lm_head.weight, hidden, targets, lm_head.bias)


def head_loss_for(choice: str, rows: int, device: torch.device, sharded: bool):
    """The loss `train.lm_head_loss` names on this device; None means the full-logits path.

    auto: liger on a GPU when liger-kernel is installed, else chunked; full in sharded runs
    (FSDP, DeepSpeed), whose LM-head weight is whole only inside the model's own forward.
    """
    if choice == "full" or (choice == "auto" and sharded):
        return None
    if choice == "auto" and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        try:
            fused = LigerCrossEntropy()
        except Exception as exc:  # noqa: BLE001 - an optional package that cannot load here must not stop the run
            log.warning("LM head + loss: chunked, not Liger-Kernel's (%s)", brief(exc))
        else:
            log.info("LM head + loss: Liger-Kernel fused linear cross-entropy")
            return fused
    log.info("LM head + loss: chunks of %d positions", rows)
    return ChunkedCrossEntropy(rows)
