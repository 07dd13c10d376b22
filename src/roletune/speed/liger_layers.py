"""Liger-Kernel's Triton kernels for the decoder layers' RMSNorm, SwiGLU and RoPE (train.liger_kernels).

On a GPU, a training step of short role-play lines waits on the host launching its kernels: on an H200 the
GPU was busy 87 ms of a 200-260 ms step of Qwen2.5-7B that launched 6,264 kernels
(benchmarks/results/h200-2026-11-30.md). In PyTorch, even as roletune.speed.lean_activations writes them, an
RMSNorm is about eight kernels forward and ten backward, SwiGLU two and four, and transformers' RoPE
(rotate_half: slices, a negation, a concatenation) about fourteen for each of q and k; Liger-Kernel runs
each as one Triton kernel forward and one or two backward: about 60 kernels fewer a layer, some 1,700 a step
for Qwen2.5-7B, a count of operators; what it buys is for benchmarks/train_speed.py's torch-kernels lever
to measure. Liger's norm and SwiGLU keep for backward what the lean ones keep (the inputs and the fp32
1/rms), so the memory estimate holds either way.

Triton runs on GPUs only, so before training each kernel runs forward and backward on a small batch of the
model's own shapes and is compared with the PyTorch it replaces; one that fails or differs is left out and
the run says why. Only modules whose forward is known are changed (lean_activations.NORMS and MLPS, and
the RoPE of ATTENTIONS), and not under torch.compile, which traces PyTorch. transformers applies RoPE
through a function of the modeling module, not a module of the model, so that function is replaced in
its module, as Liger's own patches for transformers do, by one that sends CUDA tensors to the kernel and
anything else to the original.
"""
from __future__ import annotations

import importlib.util
import sys

import torch
from torch import nn

from roletune.errors import brief
from roletune.speed.forwards import replace_forward
from roletune.speed.lean_activations import MLPS, NORMS, SILU, LeanRMSNorm, LeanSiLUMul

# transformers' attention classes that apply RoPE as apply_rotary_pos_emb(q, k, cos, sin) of their module.
ATTENTIONS = ("Qwen2Attention", "Qwen3Attention", "LlamaAttention", "MistralAttention")
DEVICES = {"cuda"}  # where Triton runs the kernels
PROBE_LENGTHS = (29, 38)  # the probe's packed row: two examples, positions restarting
TOLERANCE = 1e-2  # relative error: bf16 rounding is ~0.4%, a wrong kernel is O(1)
_KERNELS: dict = {}  # the kernels in use, by name (the replaced forwards look them up here)
_ROUTED: dict = {}  # modeling module -> its own apply_rotary_pos_emb, for those routed to the kernel


def use_kernels(model: nn.Module, choice, compiled) -> str | None:
    """For choice "auto", give a model on a GPU Liger-Kernel's kernels where they compute what they replace.
    Returns what was chosen on a GPU, and why (a line to show), else None."""
    if choice != "auto":
        restore()
        return None
    if model.device.type not in DEVICES or not installed() or not _known(model):
        return None
    if compiled:
        return "layer kernels: PyTorch's (torch.compile traces them; Liger-Kernel's are left out with train.compile)"
    try:
        kernels = load()
        problems = probe(model, kernels)
    except Exception as exc:  # noqa: BLE001 - an optional package that cannot load or run here must not stop the run
        return f"layer kernels: PyTorch's, not Liger-Kernel's ({brief(exc)})"
    used = [name for name, problem in problems.items() if problem is None]
    if "RoPE" not in used:
        restore()  # the routing is per modeling module, not per model: one whose RoPE is refused takes it back
    _KERNELS.update((name, kernels[name]) for name in used)
    install(model, used)
    refused = "; ".join(f"{name} {problem}" for name, problem in problems.items() if problem is not None)
    if not used:
        return f"layer kernels: PyTorch's, not Liger-Kernel's ({refused})"
    rest = f"; PyTorch's for the rest ({refused})" if refused else ""
    return f"layer kernels: Liger-Kernel's {_listed(used)}{rest}"


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def load() -> dict:
    """Liger-Kernel's functions, by the name of what they replace (its public functional API)."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return {"RMSNorm": liger_rms_norm, "SwiGLU": liger_swiglu, "RoPE": liger_rotary_pos_emb}


def probe(model: nn.Module, kernels: dict) -> dict[str, str | None]:
    """Each kernel against the PyTorch it replaces, forward and backward, on a packed row of the model's
    widths, dtype and device: None where it agrees, else why not."""
    config, device, dtype = model.config, model.device, model.dtype
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    tokens, hidden = sum(PROBE_LENGTHS), config.hidden_size
    known, problems = _known(model), {}
    if "RMSNorm" in known:
        norm = next(m for m in model.modules() if _kind(m) == "RMSNorm")
        weight, eps = 1 + draw(hidden) / 10, norm.variance_epsilon
        problems["RMSNorm"] = _differs(lambda x: kernels["RMSNorm"](x, weight, eps, 0.0, "llama", False),
                                       lambda x: LeanRMSNorm.apply(x, weight, eps), [draw(1, tokens, hidden)])
    if "SwiGLU" in known:
        wide = config.intermediate_size
        problems["SwiGLU"] = _differs(kernels["SwiGLU"], LeanSiLUMul.apply,
                                      [draw(1, tokens, wide), draw(1, tokens, wide)])
    rope = _rope_of(model) if "RoPE" in known else None
    if rope is not None:
        rotary, plain = rope
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        positions = torch.cat([torch.arange(n, device=device) for n in PROBE_LENGTHS])[None]
        cos, sin = rotary(draw(1, tokens, hidden), positions)
        # Laid out as the attention hands them over: the projection's output viewed by head, heads-major.
        q, k = (draw(1, tokens, n, head_dim).transpose(1, 2) for n in (heads, kv_heads))
        problems["RoPE"] = _differs(lambda q, k: kernels["RoPE"](q, k, cos, sin),
                                    lambda q, k: plain(q, k, cos, sin), [q, k])
    return problems


def install(model: nn.Module, names: list[str]) -> None:
    """Give the model's known modules the kernels in `names` (which must be in _KERNELS)."""
    for module in model.modules():
        kind = _kind(module)
        if kind not in names:
            continue
        if kind == "RMSNorm":
            replace_forward(module, _norm_forward, "Liger")
        elif kind == "SwiGLU":
            replace_forward(module, _mlp_forward, "Liger")
        else:
            _route_rope(sys.modules[type(module).__module__])


def restore() -> None:
    """Every routed modeling module's own apply_rotary_pos_emb back (train.liger_kernels=false after auto)."""
    for modeling, plain in _ROUTED.items():
        modeling.apply_rotary_pos_emb = plain
    _ROUTED.clear()


def _norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # casting_mode "llama": 1/rms in fp32, as transformers' RMSNorm; not in place, since autograd may hand
    # the same gradient buffer to more than one consumer.
    return _KERNELS["RMSNorm"](x, norm.weight, norm.variance_epsilon, 0.0, "llama", False)


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(_KERNELS["SwiGLU"](mlp.gate_proj(x), mlp.up_proj(x)))


def _route_rope(modeling) -> None:
    if modeling in _ROUTED:
        return
    plain = modeling.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or q.device.type not in DEVICES or torch.compiler.is_compiling():
            return plain(q, k, cos, sin, *args, **kwargs)
        return _KERNELS["RoPE"](q, k, cos, sin)

    _ROUTED[modeling] = plain
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _known(model: nn.Module) -> set[str]:
    """Which of the replaceable kinds the model has."""
    return {_kind(module) for module in model.modules()} - {None}


def _kind(module: nn.Module) -> str | None:
    """What a kernel would replace in `module`: its RMSNorm, SwiGLU or RoPE, or None."""
    kind = type(module).__name__
    if kind in NORMS:
        return "RMSNorm"
    if kind in MLPS and type(module.act_fn).__name__ in SILU:
        return "SwiGLU"
    return "RoPE" if kind in ATTENTIONS else None


def _rope_of(model: nn.Module):
    """(the rotary embedding module, the modeling module's own apply_rotary_pos_emb) of the model's known
    attention, or None."""
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    attention = next((m for m in model.modules() if _kind(m) == "RoPE"), None)
    if rotary is None or attention is None:
        return None
    modeling = sys.modules[type(attention).__module__]
    return rotary, _ROUTED.get(modeling, getattr(modeling, "apply_rotary_pos_emb", None))


def _differs(theirs, ours, inputs: list[torch.Tensor]) -> str | None:
    try:
        got = _outputs_and_grads(theirs, inputs)
    except Exception as exc:  # noqa: BLE001 - whatever stops a kernel here (Triton, this GPU, this dtype) leaves it out
        return f"failed: {brief(exc)}"
    want = _outputs_and_grads(ours, inputs)
    for a, b in zip(got, want):
        error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
        if not error <= TOLERANCE:  # NaN fails too
            return f"differs from PyTorch's by {error:.2g} (relative)"
    return None


def _outputs_and_grads(function, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs and input gradients of `function` on copies of `inputs` (a kernel may write its inputs in place)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator(outputs[0].device).manual_seed(1)
    grads = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=generator) for o in outputs]
    torch.autograd.backward(outputs, grads)
    return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
