"""LoRA dropout recomputed in backward instead of kept.

peft's LoRA layer computes `lora_B(lora_A(dropout(x)))`. With dropout on, every adapted projection
keeps its own dropped-out copy of its input (and the dropout mask) for the backward of lora_A:
seven copies per decoder layer, where q, k and v (and gate and up) read the same x. That is about
two fifths of what a Qwen2.5-7B layer keeps for backward with the seed's LoRA.

Here the dropout moves inside lora_A, under non-reentrant activation checkpointing: the forward
keeps only x itself (shared by the projections that read it), and the backward redraws the same mask
(checkpointing restores the RNG state) and redoes the r-wide lora_A matmul, a negligible amount of
work next to the layer's own matmuls. The masks, losses and gradients are those of peft's path.
peft offers no such option, hence this module.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class DeferredDropout(nn.Module):
    """Stands in for a LoRA layer's nn.Dropout and passes x through: its lora_A applies the dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}, applied by lora_A and recomputed in backward"


def recompute_lora_dropout(model) -> int:
    """Move the dropout of every LoRA layer of `model` (a peft model) into its lora_A, recomputed in
    backward. Returns how many adapters changed. The state dict and the saved adapter are unchanged."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, dropout in list(layer.lora_dropout.items()):
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0 or not isinstance(layer.lora_A[name], nn.Linear):
                continue
            deferred = DeferredDropout(dropout.p)  # in the module tree, so it follows model.train() / eval()
            layer.lora_dropout[name] = deferred
            project = layer.lora_A[name]
            project.forward = functools.partial(_dropout_then_project, project, deferred)
            changed += 1
    return changed


def _dropout_then_project(project: nn.Linear, deferred: DeferredDropout, x: torch.Tensor) -> torch.Tensor:
    if not (deferred.training and torch.is_grad_enabled()):
        return nn.Linear.forward(project, x)  # eval: no dropout; no_grad: nothing to keep anyway
    return checkpoint(_dropped_projection, x, project, deferred.p, use_reentrant=False)


def _dropped_projection(x: torch.Tensor, project: nn.Linear, p: float) -> torch.Tensor:
    return nn.Linear.forward(project, F.dropout(x, p, training=True))
