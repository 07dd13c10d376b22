"""RMSNorm and SwiGLU that keep only their inputs for backward (train.lean_activations).

Written as autograd does them, a Llama-family decoder layer keeps, per token:
  - for each of its two RMSNorms, an fp32 copy of the input (the norm computes in fp32): 4h bytes,
    where the bf16 input itself is 2h;
  - for the MLP's `silu(gate) * up`, gate (for silu's backward), silu(gate) and up (for the product's):
    three intermediate-wide tensors, where gate and up alone are enough to rebuild the third.
Here each becomes one autograd Function whose forward runs the same operations as transformers' module
(so the outputs are bit for bit the same) and keeps only the inputs; backward rebuilds the rest with
elementwise work that is negligible next to the layer's matmuls. For Qwen2.5-7B in bf16 that is 4h + I
fewer bytes per token and layer: 52 KB of the 230 roletune's LoRA path keeps otherwise.
Liger-Kernel does the same in Triton kernels, which need a GPU; this is plain PyTorch, so it trains
(and is tested) the same way on the CPU.

Only modules whose forward is known to be exactly the one written here are replaced (see NORMS and
MLPS); others are left as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roletune.speed.forwards import replace_forward

# transformers' classes whose forward is Qwen2RMSNorm's / Qwen2MLP's, line for line.
NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP")
SILU = ("SiLUActivation", "SiLU")


class LeanRMSNorm(torch.autograd.Function):
    """`weight * (x / rms(x)).to(x.dtype)`, computed in fp32 like transformers' RMSNorm, keeping x and
    the per-token 1/rms for backward instead of an fp32 copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(input_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        x32 = x.to(torch.float32)
        normed = x32 * inv_rms
        grad_normed = (grad * weight).to(torch.float32)
        # d(x * r)/dx with r = (mean(x^2) + eps)^-1/2: r * (g - normed * mean(g * normed))
        grad_x = inv_rms * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


class LeanSiLUMul(torch.autograd.Function):
    """`silu(gate) * up`, keeping gate and up; silu(gate) is rebuilt in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # The same operations autograd runs for F.silu(gate) * up, so the gradients are the same too.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def make_lean(model: nn.Module) -> int:
    """Replace the forward of every known RMSNorm and SwiGLU MLP in `model` by its lean version.
    Returns how many modules changed; parameters, state dict and outputs are unchanged."""
    changed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind in NORMS:
            replace_forward(module, _norm_forward, "Lean")
        elif kind in MLPS and type(module.act_fn).__name__ in SILU:
            replace_forward(module, _mlp_forward, "Lean")
        else:
            continue
        changed += 1
    return changed


# Under torch.compile (train.compile) the modules' own forward is traced instead: the compiler's partitioner
# chooses what to keep and what to recompute by itself, and a custom autograd Function in the graph keeps
# torch.compile from caching its traced graph for the next run (on the CPU a warm start then took 15 s, not 9).
def _norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return norm.plain_forward(x)
    return LeanRMSNorm.apply(x, norm.weight, norm.variance_epsilon)


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return mlp.plain_forward(x)
    return mlp.down_proj(LeanSiLUMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))
