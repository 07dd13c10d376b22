"""LoRA dropout recomputed in backward instead of kept.

peft's LoRA layer computes `lora_B(lora_A(dropout(x)))`. With dropout on, every adapted projection
keeps its own dropped-out copy of its input (and the dropout mask) for the backward of lora_A:
seven copies per decoder layer, where q, k and v (and gate and up) read the same x. That is about
two fifths of what a Qwen2.5-7B layer keeps for backward with the seed's LoRA.

Here the dropout moves inside lora_A: the forward keeps only x itself (shared by the projections
that read it) and the RNG state the mask was drawn from; the backward redraws the same mask and
redoes the r-wide lora_A matmul, a negligible amount of work next to the layer's own matmuls. The
masks, losses and gradients are those of peft's path. peft offers no such option, hence this module.
It is an autograd Function rather than torch.utils.checkpoint, which does the same but costs several
times a plain projection's Python time per call (measured on the CPU), paid twice per adapted
projection and step; under torch.compile, which traces checkpointing well, it is checkpointing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from roletune.speed import graphs
from roletune.speed.forwards import replace_forward


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
            layer.lora_dropout[name] = DeferredDropout(dropout.p)  # where peft's dropout was, for whoever looks
            project = layer.lora_A[name]
            project.dropout_p = dropout.p
            replace_forward(project, _dropout_then_project, "Dropped")
            changed += 1
    return changed


def _dropout_then_project(project: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # lora_A follows model.train() / eval() as the dropout module it replaces did
    if not (project.training and torch.is_grad_enabled()):
        return project.plain_forward(x)  # eval: no dropout; no_grad: nothing to keep anyway
    if torch.compiler.is_compiling():
        return checkpoint(_dropped_projection, x, project.weight, project.bias, project.dropout_p, use_reentrant=False)
    if graphs.capturing():  # a CUDA graph being recorded cannot restore the RNG state: autograd keeps x's copy
        return _dropped_projection(x, project.weight, project.bias, project.dropout_p)
    return _RedrawnDropout.apply(x, project.weight, project.bias, project.dropout_p)


def _dropped_projection(x, weight, bias, p: float) -> torch.Tensor:
    return F.linear(F.dropout(x, p, training=True), weight, bias)


class _RedrawnDropout(torch.autograd.Function):
    """linear(dropout(x)) keeping x and the RNG state: backward redraws the mask and differentiates the
    same operations under the same autocast state, so the gradients are autograd's own."""

    @staticmethod
    def forward(ctx, x, weight, bias, p):
        device = x.device.type
        ctx.p, ctx.rng = p, rng_state(x.device)
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, weight, bias)
        return _dropped_projection(x, weight, bias, p)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        device, autocast, dtype = ctx.autocast
        x = saved[0]
        current = rng_state(x.device)
        set_rng_state(x.device, ctx.rng)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            inputs = [t.detach().requires_grad_(needed) if t is not None else None
                      for t, needed in zip(saved, ctx.needs_input_grad)]
            out = _dropped_projection(*inputs, ctx.p)
        set_rng_state(x.device, current)  # the forward's random stream goes on as if nothing was redrawn
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None)


def rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)
