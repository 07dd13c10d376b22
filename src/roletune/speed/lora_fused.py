"""The LoRA branch of each adapted projection as one autograd function.

peft computes an adapted projection as `result + lora_B(lora_A(dropout(x))) * scaling`, op by op: on a
GPU about seven kernels forward and twelve backward per projection, and as many autograd nodes, for two
r-wide matmuls whose arithmetic is negligible. A 7B model has 196 adapted projections (the seed's seven
per layer), so this is most of the kernels a training step launches; on short role-play lines a step is
small enough that launching kernels from Python, not the GPU's arithmetic, is what it can end up
waiting on.

Here the branch is one torch.autograd.Function: dropout (drawn as F.dropout draws it on that device,
redrawn in backward from the saved RNG state as roletune.speed.lora_dropout does), lora_A, lora_B with the
scaling folded into its 16-bit copy, and the add folded into the matmul (addmm). On a GPU: three kernels
forward (the 16-bit copies of lora_A and scaling * lora_B are made for all layers at once as the model's
forward starts, see AdapterCopies), eight backward, one autograd node. Folding the scale and the add also
spares the GPU's memory peft's separate product, scaling and sum pass over: each projection's whole
output, four times forward and twice backward (for the seed's seven projections of Qwen2.5-7B, about 0.5
GB per layer and 1,400-token step, forward). The masks, outputs and gradients are peft's, up to the
rounding of the fused add. peft has no such training path, and Unsloth's fused LoRA kernels apply only
with dropout 0 (with any other dropout it falls back to peft's path; the seed trains with 0.1), hence this
module.

Forwards without gradients in eval mode (sample answers, the eval loss, `roletune generate`, `chat`,
`compare`, `eval`) take a plainer path: no dropout and nothing kept, so the branch is two r-wide matmuls on
the same copies and an add into the base's output, three kernels where peft runs four (its scaling apart).
Decoding is a forward per token, and on a GPU a decoding step waits on the host launching it, so each
kernel and call per projection counts 196 times a token for a 7B model (benchmarks/decode_time.py). So
what a call would work out before its kernels (may it fuse, in which dtype, with which copies) is worked
out for every layer once as the model's forward starts (_Plan), and a plain base nn.Linear is called as
F.linear rather than as a module.

The fused path runs only where it computes what peft would: a training forward with gradients or an eval
forward without, one active plain LoRA adapter without bias, in training its dropout redrawn (or none) and
the input either in the adapter's dtype or under autocast (roletune.speed.lora_inputs).
Anything else (adapters disabled or merged, lora.dtype=fp32's fp32 copies in training, peft's kept dropout,
torch.compile, which traces peft's own ops) runs peft's forward unchanged.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from roletune.speed import graphs
from roletune.speed.forwards import innermost_holder, replace_forward
from roletune.speed.lora_dropout import DeferredDropout, rng_state, set_rng_state

# Devices where F.dropout runs the fused native_dropout kernel (ATen's is_fused_kernel_acceptable);
# elsewhere (the CPU) it multiplies by a float noise tensor. Drawing the same way draws the same mask.
FUSED_DROPOUT_DEVICES = {"cuda", "xpu"}


def fuse_lora_layers(model, grouping=None) -> int:
    """Give every plain peft LoRA Linear of `model` the fused branch; returns how many. The parameters,
    the state dict and the saved adapter are unchanged (bitsandbytes LoRA layers are left as they are).
    grouping: (model, fused layers) -> groups whose training branches share their lora_A work
    (lora_grouped.group_shared_inputs, which lora_grouped.fuse_lora hands in for lora.grouped)."""
    from peft.tuners.lora.layer import Linear

    layers = [module for module in model.modules() if type(module) is Linear]
    for layer in layers:
        replace_forward(layer, _forward, "Fused")
        layer.__dict__[PLAN] = None
    if layers:
        copies = AdapterCopies(layers, grouping(model, layers) if grouping else [])
        # On the innermost module every forward passes through, training's (through the PeftModel) and
        # generation's (peft's generate calls the inner CausalLM), so no forward runs on stale copies or plans.
        ancestor = innermost_holder(model, layers)
        ancestor.register_forward_pre_hook(copies.refresh, with_kwargs=True)
        ancestor.register_forward_hook(copies.forget, always_call=True)  # even when the forward raised
        for layer in layers:
            _copies[layer] = copies
    return len(layers)


_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fused layer -> its model's AdapterCopies
GROUP = "_lora_group"  # a fused layer's roletune.speed.lora_grouped.Group, in its __dict__ (where lora.grouped made one)
PLAN = "_fused_plan"  # a fused layer's _Plan for the model forward under way, in its __dict__ (read without
# nn.Module.__getattr__), else None


class _Plan(NamedTuple):
    """How a fused layer's forward runs, worked out for every layer at once as the model's forward starts
    (AdapterCopies.refresh) instead of in each of its 196 calls: the checks of _fusable_branch, the branch's
    dtype, the adapter's copies. Those calls are a decoding step's host time, which is what a GPU decoding
    a few prompts waits on. Valid for inputs of `input_dtype` in the grad and autocast state it was made in."""
    grad: bool
    input_dtype: torch.dtype
    device_type: str
    autocast: torch.dtype | None  # _autocast
    base: tuple | None  # (weight, bias) of a plain nn.Linear base without hooks, for F.linear; else None
    weight_a: torch.Tensor
    weight_b: torch.Tensor
    scaling: float
    p: float  # dropout
    dtype: torch.dtype  # what the branch multiplies in (_branch_dtype)
    pair: tuple  # (lora_A, scaling * lora_B) in dtype (_adapter_pair)
    group: object = None  # the roletune.speed.lora_grouped.Group a training branch joins, if any


def _forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Compiled code first, so it neither runs nor guards on what follows; other arguments are peft's to take.
    if torch.compiler.is_compiling() or args or kwargs:
        return layer.plain_forward(x, *args, **kwargs)
    plan = current_plan(layer, x)
    if plan is None:
        return layer.plain_forward(x)
    result = layer.base_layer(x) if plan.base is None else F.linear(x, *plan.base)
    if not plan.grad:  # eval and generation: no dropout, nothing kept for a backward
        return _add_branch(result, x, plan.dtype, *plan.pair)
    if plan.group is not None:
        out = plan.group.branch(layer, x, result, plan)
        if out is not None:
            return out
    return _LoraBranch.apply(result, x, plan.weight_a, plan.weight_b, plan.scaling, plan.p, plan.dtype, plan.pair)


def current_plan(layer, x: torch.Tensor) -> _Plan | None:
    """The layer's _Plan for input x: the one its model's forward made, where it still holds, else worked out now
    (None: peft's forward runs)."""
    plan = layer.__dict__[PLAN]
    if (plan is None or x.dtype != plan.input_dtype or torch.is_grad_enabled() != plan.grad
            or _autocast(plan.device_type) != plan.autocast):
        plan = _plan(layer, x.dtype, x.device.type, _copies.get(layer))
    return plan


def _plan(layer, input_dtype: torch.dtype, device_type: str, copies, hooked: bool | None = None) -> _Plan | None:
    """The layer's _Plan for inputs of `input_dtype` (and no other arguments) now, or None where peft's forward
    must run. `hooked`: whether global module hooks are set (_global_hooks), where the caller looked already."""
    branch = _fusable_branch(layer, input_dtype)
    if branch is None:
        return None
    name, weight_a, weight_b, scaling, p = branch
    dtype = _branch_dtype(device_type, layer.cast_input_dtype_enabled, weight_a.dtype, input_dtype)
    grad = torch.is_grad_enabled()
    with torch.no_grad():  # the branch's operands; its gradients are _LoraBranch's to compute
        pair = _adapter_pair(copies, (layer, name), weight_a, weight_b, scaling, dtype)
    base = layer._modules["base_layer"]
    plain = not (_global_hooks() if hooked is None else hooked)
    group = layer.__dict__.get(GROUP) if grad else None
    return _Plan(grad, input_dtype, device_type, _autocast(device_type),
                 _plain_linear(base) if plain else None, weight_a, weight_b, scaling, p, dtype, pair, group)


def _plain_linear(module) -> tuple | None:
    """(weight, bias) where calling `module` is exactly F.linear(x, weight, bias): an nn.Linear whose forward
    nothing replaced (accelerate's offload hooks do) and that no hook of its own watches. Calling F.linear
    spares the module call's own host time, 196 times a forward."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return None
    return module._parameters["weight"], module._parameters["bias"]


def _autocast(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on this device where it is on, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _global_hooks() -> bool:
    """Whether hooks on every module's calls are set (torch.nn.modules.module.register_module_forward_hook
    and its kin): then each base layer is called as a module, for them to see."""
    return any(getattr(torch.nn.modules.module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


class AdapterCopies:
    """lora_A and scaling * lora_B of every fused layer, in the dtype the branch multiplies them in.

    Cast in each branch, they cost two kernels per adapted projection and forward (392 for a 7B model with
    the seed's seven projections a layer), for weights that change only at the optimizer step. Here a
    forward pre-hook refreshes every layer's copies as each forward the fused branch runs in starts, with
    multi-tensor kernels (a handful of launches in all), then the branches take theirs. Refreshed every
    forward, not tracked: a weight's version counter does not tell (the fused optimizer updates the weights
    in place without bumping it). Only a generate call's later steps, which decode on from its KV cache,
    keep the copies its first step made: nothing changes the adapter within a call.
    The same values as casting in the branch: lora_A cast, B times scaling in the weights' precision then
    rounded once. A branch whose copy does not match (another dtype, a changed scaling or weight, an
    adapter added later) casts its own, as before.
    """

    def __init__(self, layers: list, groups: list = ()):
        self.layers = layers
        self.entries = [(layer, name) for layer in layers for name in layer.lora_A]
        self.index = {(id(layer), name): i for i, (layer, name) in enumerate(self.entries)}
        self.sources_a = [layer.lora_A[name].weight for layer, name in self.entries]
        self.sources_b = [layer.lora_B[name].weight for layer, name in self.entries]
        # roletune.speed.lora_grouped's groups; the lora_A copies of each group's adapter are made as the rows of one
        # tensor, which its batched matmul reads without stacking them every forward.
        self.groups = list(groups)
        self.stacked = [rows for group in self.groups for rows in self._group_rows(group)]
        self.input_dtype = layers[0].base_layer.weight.dtype  # what hidden states come in as without autocast
        self.dtype, self.a, self.b, self.scalings = None, [], [], []
        # Every dtype's copies, made once and refreshed in place: training (bf16 under autocast) and sample
        # answers (fp32) alternate, and CUDA graphs (roletune.speed.layer_graphs) read the training copies by address.
        self.by_dtype: dict = {}
        self.plans = None  # (the state they hold for, every layer's _Plan), as the last forward made them
        self.cache = None  # a weak reference to the KV cache of the last forward, if it had one

    def refresh(self, module, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            return  # compiled code runs peft's forward
        self.forget()
        if module.training != torch.is_grad_enabled():
            return  # forwards the fused branch leaves to peft
        # The branches' own rule, for the input the model's hidden states come in as.
        device_type = self.sources_a[0].device.type
        dtype = _branch_dtype(device_type, self.entries[0][0].cast_input_dtype_enabled, self.sources_a[0].dtype,
                              self.input_dtype)
        # A generate call's later steps keep the copies and plans of its first: nothing changes the adapter,
        # nor whether it is on, within a call. They are the forwards given the KV cache the last one was: generate
        # makes a new cache per call (told by identity: a static cache's length is only known on the GPU).
        cache = graphs.kv_cache(kwargs)
        continues = dtype == self.dtype and cache is not None and self.cache is not None and self.cache() is cache
        self.cache = None if cache is None else weakref.ref(cache)
        if not continues:
            self._copy(dtype)
        first = self.layers[0]  # peft switches adapters on and off, merges and picks them for all layers at once
        state = (torch.is_grad_enabled(), _autocast(device_type), first.disable_adapters, first.merged,
                 tuple(first.active_adapters))
        if not continues or self.plans is None or self.plans[0] != state:
            hooked = _global_hooks()
            self.plans = state, [_plan(layer, self.input_dtype, device_type, self, hooked) for layer in self.layers]
        for layer, plan in zip(self.layers, self.plans[1]):
            layer.__dict__[PLAN] = plan

    def _group_rows(self, group) -> list[list[int]]:
        """For each adapter all of `group`'s layers have with lora_A of one shape, the entries of their lora_A."""
        rows = []
        for name in group.members[0].lora_A:
            where = [self.index.get((id(layer), name)) for layer in group.members]
            if None not in where and len({self.sources_a[i].shape for i in where}) == 1:
                rows.append(where)
        return rows

    def _copy(self, dtype: torch.dtype) -> None:
        if dtype not in self.by_dtype:
            with torch.inference_mode(False):  # made during generation, still written by training forwards
                a = [None] * len(self.sources_a)
                for rows in self.stacked:
                    first = self.sources_a[rows[0]]
                    stack = torch.empty((len(rows), *first.shape), dtype=dtype, device=first.device)
                    for i, row in zip(rows, stack.unbind(0)):
                        a[i] = row
                self.by_dtype[dtype] = ([torch.empty_like(w, dtype=dtype) if t is None else t
                                         for t, w in zip(a, self.sources_a)],
                                        [torch.empty_like(w, dtype=dtype) for w in self.sources_b])
        self.a, self.b = self.by_dtype[dtype]
        self.dtype = dtype
        self.scalings = [layer.scaling[name] for layer, name in self.entries]
        with torch.no_grad():
            torch._foreach_copy_(self.a, self.sources_a)
            torch._foreach_copy_(self.b, torch._foreach_mul(self.sources_b, self.scalings))

    def forget(self, *hook_args) -> None:
        """Take the plans from the layers as a forward ends (self.plans keeps them for a generate call's next
        step): a layer called outside a forward (a checkpointed layer recomputed in the backward, a test
        calling it) works its way out in full."""
        if torch.compiler.is_compiling():
            return
        for layer in self.layers:
            layer.__dict__[PLAN] = None
        for group in self.groups:
            group.pending = None

    def get(self, layer, name: str, weight_a, weight_b, scaling: float, dtype: torch.dtype):
        """(lora_A, scaling * lora_B) in `dtype` for this branch, or None where its copies do not match."""
        i = self.index.get((id(layer), name))
        if i is None or dtype != self.dtype or scaling != self.scalings[i]:
            return None
        if weight_a is not self.sources_a[i] or weight_b is not self.sources_b[i]:
            return None
        return self.a[i], self.b[i]


def _fusable_branch(layer, input_dtype: torch.dtype):
    """(adapter name, lora_A's weight, lora_B's, scaling, dropout p) when the fused branch computes what peft's
    forward would for an input of `input_dtype` (and no other arguments), else None. Submodules and weights
    are read from their dicts, not through nn.Module.__getattr__ (about half a microsecond each, and this runs
    for 196 layers a forward)."""
    if layer.disable_adapters or layer.merged:
        return None
    training, grad = layer.training, torch.is_grad_enabled()
    if training != grad:  # dropout without a backward, or gradients through an eval-mode forward: peft's
        return None
    adapters = layer._modules
    active = [name for name in layer.active_adapters if name in adapters["lora_A"]]
    if len(active) != 1 or active[0] in layer.lora_variant:  # several adapters, DoRA and other variants
        return None
    name = active[0]
    lora_A, lora_B = adapters["lora_A"][name]._parameters, adapters["lora_B"][name]._parameters
    if lora_A.get("bias") is not None or lora_B.get("bias") is not None:
        return None
    weight_a, weight_b = lora_A["weight"], lora_B["weight"]
    if not training:  # dropout is off in eval mode, whatever module stands for it
        return name, weight_a, weight_b, layer.scaling[name], 0.0
    dropout = adapters["lora_dropout"][name]
    if isinstance(dropout, DeferredDropout):
        p = dropout.p
    elif isinstance(dropout, nn.Identity):  # peft's stand-in for dropout 0
        p = 0.0
    else:
        return None  # peft's own dropout, keeping its dropped-out copy (lora.recompute_dropout=false)
    if layer.cast_input_dtype_enabled and input_dtype != weight_a.dtype:
        return None  # peft copies x to the adapter's dtype first (lora.dtype=fp32): its path, its cost
    return name, weight_a, weight_b, layer.scaling[name], p


def _branch_dtype(device: str, casts_input: bool, adapter_dtype: torch.dtype, input_dtype: torch.dtype):
    """What peft multiplies the branch in: autocast's dtype where it is on, else the adapter's where the layer
    casts its input to it (peft's default), else the input's."""
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return adapter_dtype if casts_input else input_dtype


def _adapter_pair(copies, where, weight_a, weight_b, scaling: float, dtype: torch.dtype):
    """(lora_A, scaling * lora_B) in `dtype`: the model's copies where they match, else cast here."""
    pair = copies.get(*where, weight_a, weight_b, scaling, dtype) if copies is not None else None
    return pair if pair is not None else _cast_pair(weight_a, weight_b, scaling, dtype)


def _cast_pair(weight_a, weight_b, scaling: float, dtype: torch.dtype):
    """(lora_A, scaling * lora_B) cast to `dtype` here."""
    return weight_a.to(dtype), _scaled(weight_b, scaling, dtype)


def _add_branch(result, x, dtype: torch.dtype, a, b) -> torch.Tensor:
    """result + scaling * lora_B(lora_A(x)) without autograd (eval mode: no dropout), `b` holding the scaling,
    added into `result` in place (the base layer's fresh output, which nothing else holds) as peft adds it: in
    the wider dtype, then rounded to result's. Three kernels, and no other call: a decoding step runs this
    for every adapted projection."""
    branch = F.linear(F.linear(as_dtype(x, dtype), a), b)
    return result.add_(branch)  # in result's dtype, computed in the wider of the two: peft's sum, then cast


class _LoraBranch(torch.autograd.Function):
    """result + scaling * lora_B(lora_A(dropout(x))), keeping x, the RNG state (the mask, in a CUDA graph
    recording: see roletune.speed.layer_graphs) and the r-wide tensors.
    Written for little Python per call: it runs twice per adapted projection and step."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling: float, p: float, dtype: torch.dtype, pair=None):
        # dtype: what peft's F.linear computes in (_branch_dtype). Every operand is cast to it here, so autocast,
        # where it is on, has nothing left to cast.
        rows = x.reshape(-1, x.shape[-1])
        mask = None
        if p and graphs.capturing():  # a recording cannot save and restore the RNG state: keep the mask
            rows, mask = _dropout(rows, p)
            mask = _packed_bits(mask)
        elif p:
            ctx.rng = rng_state(x.device)
            rows = _dropout(rows, p)[0]
        # scaling * B: no separate multiply, forward or backward. `pair`: the plan's (_adapter_pair), else cast here.
        a, b = pair if pair is not None else _cast_pair(weight_a, weight_b, scaling, dtype)
        h = torch.mm(as_dtype(rows, dtype), a.t())
        ctx.save_for_backward(x, a, b, h, mask)
        ctx.p, ctx.scaling, ctx.dtypes = p, scaling, (weight_a.dtype, weight_b.dtype)
        return _plus_product(result, h, b, dtype)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h, mask = ctx.saved_tensors
        _, needs_x, needs_a, needs_b = ctx.needs_input_grad[:4]
        rows = as_dtype(grad.reshape(-1, grad.shape[-1]), a.dtype)
        grad_x = grad_a = None
        grad_h, grad_b = _lora_b_grads(rows, h, b, ctx.scaling, ctx.dtypes[1], needs_x or needs_a, needs_b)
        if grad_h is not None:
            dropped = x.reshape(-1, x.shape[-1])
            if mask is not None:
                mask = _unpacked_bits(mask)
                dropped = _through_dropout(dropped, mask, ctx.p)  # x * mask / (1 - p), as the forward drew it
            elif ctx.p:
                dropped, mask = _redraw(dropped, ctx.p, ctx.rng)
            if needs_a:
                grad_a = as_dtype(torch.mm(grad_h.t(), as_dtype(dropped, a.dtype)), ctx.dtypes[0])
            if needs_x:
                grad_x = as_dtype(torch.mm(grad_h, a), x.dtype)
                if mask is not None:
                    grad_x = _through_dropout(grad_x, mask, ctx.p)
                grad_x = grad_x.view(x.shape)
        return grad, grad_x, grad_a, grad_b, None, None, None, None


class LoraB(torch.autograd.Function):
    """result + scaling * lora_B(h), h the r-wide lora_A product computed elsewhere (roletune.speed.lora_grouped):
    the second half of _LoraBranch, keeping h and the copy of scaling * lora_B."""

    @staticmethod
    def forward(ctx, result, h, weight_b, scaling: float, dtype: torch.dtype, b):
        ctx.save_for_backward(h, b)
        ctx.scaling, ctx.dtype = scaling, weight_b.dtype
        return _plus_product(result, h, b, dtype)

    @staticmethod
    def backward(ctx, grad):
        h, b = ctx.saved_tensors
        _, needs_h, needs_b = ctx.needs_input_grad[:3]
        rows = as_dtype(grad.reshape(-1, grad.shape[-1]), b.dtype)
        return grad, *_lora_b_grads(rows, h, b, ctx.scaling, ctx.dtype, needs_h, needs_b), None, None, None


def _lora_b_grads(rows, h, b, scaling: float, dtype: torch.dtype, needs_h: bool, needs_b: bool):
    """(the gradient of h, of lora_B) from the output's gradient `rows`: d(scaling * B) = g^T h, so
    dB = scaling * g^T h, in the weight's dtype."""
    grad_b = _scaled(torch.mm(rows.t(), h), scaling, dtype) if needs_b else None
    return (torch.mm(rows, b) if needs_h else None), grad_b


def _plus_product(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """result + h b^T computed in `dtype` (_add_product), in result's shape and dtype: both training branches'
    last step."""
    out = _add_product(as_dtype(result.reshape(-1, result.shape[-1]), dtype), h, b)
    return as_dtype(out.view(result.shape), result.dtype)


def _add_product(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """result + h b^T in one kernel, rounded once (peft rounds the product, then the sum)."""
    return torch.addmm(result, h, b.t())


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call where t has it already: a cast that changes nothing still costs a dispatch
    (2.7 us on the 2-core CPU, 0.2 us for the check), and the branches run some 1,200 of them a step (under
    autocast, most of their operands are already in its dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scaling * t in `dtype`, in one kernel (the multiply writes the cast result)."""
    return torch.mul(t, scaling, out=t.new_empty(t.shape, dtype=dtype))


def _dropout(rows: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F.dropout(rows, p) drawn as F.dropout draws it on this device, and its mask: a bool tensor from
    the fused kernel, else the float noise (0 or 1/(1-p)) the CPU's F.dropout multiplies by."""
    if rows.device.type in FUSED_DROPOUT_DEVICES and rows.numel():
        return torch.native_dropout(rows, p, True)
    noise = torch.empty_like(rows).bernoulli_(1 - p).div_(1 - p)  # F.dropout on the CPU, op for op
    return rows * noise, noise


def _packed_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (the fused kernel's) kept as 8 elements a byte, where its rows divide by 8: what a CUDA graph
    recording keeps of each adapted projection's dropout (for Qwen2.5-7B 5 KB a token and layer instead of 40).
    Other masks (the CPU's float noise) are kept as they are."""
    if mask.dtype != torch.bool or mask.shape[-1] % 8:
        return mask
    bits = mask.view(*mask.shape[:-1], -1, 8).to(torch.uint8) << _bit_places(mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def _unpacked_bits(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.uint8:
        return mask
    bits = (mask.unsqueeze(-1) >> _bit_places(mask.device)) & 1
    return bits.view(*mask.shape[:-1], -1).bool()


def _bit_places(device: torch.device) -> torch.Tensor:
    # Made on the device, not copied to it: a host-to-device copy is not allowed inside a CUDA graph recording.
    return torch.arange(8, dtype=torch.uint8, device=device)


def _through_dropout(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, 1 / (1 - p))
    return grad * mask


def _redraw(rows: torch.Tensor, p: float, rng: torch.Tensor):
    """The forward's dropout of `rows` again, from its RNG state; the random stream goes on as it was."""
    current = rng_state(rows.device)
    set_rng_state(rows.device, rng)
    try:
        return _dropout(rows, p)
    finally:
        set_rng_state(rows.device, current)
