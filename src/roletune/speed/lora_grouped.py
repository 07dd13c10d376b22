"""The adapted projections that read one input (q, k and v; gate and up) do their lora_A work together.

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj and up_proj on the
same ones. roletune.speed.lora_fused runs each projection's training branch on its own: forward a dropout draw and an
r-wide lora_A matmul, backward the redraw and two more r-wide matmuls (lora_A's gradient, the input's). An
8-wide matmul is far too thin to fill a GPU, so each costs about what launching it costs, whatever its size.
Here the first projection of a group called on a tensor draws the dropout of every projection of the group in
one call on the input repeated (one independent mask each, drawn as one tensor) and multiplies each by its own
lora_A in one batched matmul; its siblings, called next on the same tensor, take their r-wide products from
it, and each adds its own lora_B as before (lora_fused.LoraB). In backward one node redraws the masks and gives
every lora_A and the input their gradients, one batched matmul each. For the seed's seven projections a layer
runs 9 r-wide matmuls fewer (3 forward, 6 backward) and 3 dropout draws fewer each way
(tests/test_lora_grouped.py counts them).

The masks are drawn as one tensor rather than one per projection: as random, independent between projections,
but not the masks peft's path or lora_fused draws, hence `lora.grouped` (off by default until a GPU has
measured it). Without dropout the loss and gradients are lora_fused's up to rounding (the input's gradient
adds the projections' parts inside one matmul). A call the group cannot serve (a member whose plan differs,
a sibling called on another tensor) runs lora_fused's branch of its own, so the grouping changes nothing but
the masks and the kernels; torch.compile, eval forwards and peft's own forward never group.
"""
from __future__ import annotations

import torch
from torch import nn

from roletune.model import SHARED_INPUTS
from roletune.speed import graphs, lora_fused
from roletune.speed.lora_dropout import rng_state


def fuse_lora(model, grouped: bool = False) -> int:
    """Every plain peft LoRA Linear of `model` gets the fused branch (lora.fused); with `grouped`
    (lora.grouped) the projections that read one input share their dropout draw and lora_A matmuls.
    Returns how many layers were fused."""
    return lora_fused.fuse_lora_layers(model, group_shared_inputs if grouped else None)


def group_shared_inputs(model: nn.Module, layers: list) -> list[Group]:
    """A Group for each set of two or more of the fused `layers` that one module holds under the names of a
    model.SHARED_INPUTS entry (Qwen2's, Llama's and Mistral's attention and MLP call them on one input)."""
    fused = {id(layer) for layer in layers}
    groups = []
    for module in model.modules():
        for names in SHARED_INPUTS:
            members = [module._modules.get(name) for name in names]
            members = [member for member in members if member is not None and id(member) in fused]
            if len(members) > 1:
                group = Group(members)
                for member in members:
                    member.__dict__[lora_fused.GROUP] = group
                groups.append(group)
    return groups


class Group:
    """The fused layers of one module that read the same input, and the r-wide products the member that led
    the last call on an input left for the others."""

    def __init__(self, members: list):
        self.members = members
        self.pending = None  # (the input, {member: its product}) until the members have taken theirs

    def branch(self, layer, x: torch.Tensor, result: torch.Tensor, plan) -> torch.Tensor | None:
        """result + scaling * lora_B(lora_A(dropout(x))) for `layer`, with lora_A's product shared with the group,
        or None where the group cannot serve this call (then the layer runs lora_fused's own branch)."""
        h = self._take(layer, x)
        if h is None:
            h = self._lead(layer, x, plan)
        if h is None:
            return None
        return lora_fused.LoraB.apply(result, h, plan.weight_b, plan.scaling, plan.dtype, plan.pair[1])

    def _take(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        pending = self.pending
        if pending is None or pending[0] is not x:
            return None
        h = pending[1].pop(layer, None)
        if not pending[1]:
            self.pending = None  # nothing of the input kept past its last member
        return h

    def _lead(self, layer, x: torch.Tensor, plan) -> torch.Tensor | None:
        plans = [plan if member is layer else lora_fused.current_plan(member, x) for member in self.members]
        if not all(_joins(other, plan) for other in plans):
            return None
        products = SharedInput.apply(x, _stacked([other.pair[0] for other in plans]), plan.p, plan.dtype,
                                     *[other.weight_a for other in plans])
        self.pending = (x, {member: h for member, h in zip(self.members, products) if member is not layer})
        return products[self.members.index(layer)]


def _joins(other, plan) -> bool:
    """Whether a member's plan computes its branch as the leader's does: a training branch with the same dropout,
    dtype and lora_A (shape and dtype)."""
    return (other is not None and other.grad and other.p == plan.p and other.dtype == plan.dtype
            and other.weight_a.shape == plan.weight_a.shape and other.weight_a.dtype == plan.weight_a.dtype)


def _stacked(copies: list[torch.Tensor]) -> torch.Tensor:
    """The members' lora_A copies as one (members, r, in) tensor: the one lora_fused.AdapterCopies made them the
    rows of, where they still are its rows in order, else stacked here."""
    base = copies[0]._base
    if (base is not None and base.dim() == 3 and base.shape[0] == len(copies)
            and all(c._base is base and c.storage_offset() == i * c.numel() for i, c in enumerate(copies))):
        return base
    return torch.stack(copies)


class SharedInput(torch.autograd.Function):
    """lora_A_i(dropout_i(x)) for each member i, as r-wide rows (tokens, r): keeps x, the stacked lora_A copies
    and the RNG state (the masks, in a CUDA graph recording, as lora_fused._LoraBranch does)."""

    @staticmethod
    def forward(ctx, x, stack, p: float, dtype: torch.dtype, *weights_a):
        members, r, width = stack.shape
        rows = x.reshape(-1, width)
        mask = None
        if p:
            each = rows.expand(members, *rows.shape)  # no copy: the dropout writes the masked copies
            if graphs.capturing():
                dropped, mask = lora_fused._dropout(each, p)
                mask = lora_fused._packed_bits(mask)
            else:
                ctx.rng = rng_state(x.device)
                dropped = lora_fused._dropout(each, p)[0]
            products = torch.bmm(lora_fused.as_dtype(dropped, dtype), stack.transpose(1, 2)).unbind(0)
        else:  # one input for all: one matmul against the lora_A rows side by side
            products = torch.mm(lora_fused.as_dtype(rows, dtype), stack.view(members * r, width).t()).split(r, dim=1)
        ctx.save_for_backward(x, stack, mask)
        ctx.p, ctx.dtype = p, weights_a[0].dtype  # the members' lora_A share it (_joins)
        return products

    @staticmethod
    def backward(ctx, *grads):
        x, stack, mask = ctx.saved_tensors
        members, r, width = stack.shape
        needs_x, needs_a = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        rows = x.reshape(-1, width)
        grad_x = grad_a = None
        if ctx.p:
            each = rows.expand(members, *rows.shape)
            if mask is not None:
                mask = lora_fused._unpacked_bits(mask)
                dropped = lora_fused._through_dropout(each, mask, ctx.p)
            else:
                dropped, mask = lora_fused._redraw(each, ctx.p, ctx.rng)
            grad_h = lora_fused.as_dtype(torch.stack(grads), stack.dtype)  # (members, tokens, r)
            if needs_a:
                grad_a = torch.bmm(grad_h.transpose(1, 2), lora_fused.as_dtype(dropped, stack.dtype))
            del dropped  # members x tokens x width: freed before the input's gradient needs as much again
            if needs_x:  # each member's part through its own mask, then their sum
                grad_x = lora_fused._through_dropout(torch.bmm(grad_h, stack), mask, ctx.p).sum(0)
        else:
            grad_h = lora_fused.as_dtype(torch.cat(grads, dim=1), stack.dtype)  # (tokens, members * r)
            if needs_a:
                grad_a = torch.mm(grad_h.t(), lora_fused.as_dtype(rows, stack.dtype)).view(members, r, width)
            if needs_x:
                grad_x = torch.mm(grad_h, stack.view(members * r, width))
        if grad_x is not None:
            grad_x = lora_fused.as_dtype(grad_x, x.dtype).view(x.shape)
        grads_a = [None] * members if grad_a is None else lora_fused.as_dtype(grad_a, ctx.dtype).unbind(0)
        return grad_x, None, None, None, *grads_a
