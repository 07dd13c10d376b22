"""Padding-free attention on PyTorch's own variable-length flash kernel.

A packed micro-batch is one row of many examples. With sdpa, transformers keeps them apart with a
block-diagonal T x T mask, and a mask rules out sdpa's flash kernel: the memory-efficient kernel runs
instead, over the whole T x T square (16 examples of ~66 tokens: 16 times the pairs that matter).
flash-attention's varlen kernel takes the example boundaries (cu_seq_lens) and attends within each
example only, but it is a separate package with a CUDA build to match. PyTorch >= 2.10 ships the same
kind of kernel as torch.nn.attention.varlen.varlen_attn; transformers has no attention implementation
that calls it (its flash paths import the flash-attention package), hence this module: an attention
function registered with transformers under the name "varlen".

It runs only on a packed batch that carries its boundaries (the packing collator adds them when this
implementation is active); anything else (generation, padded batches) goes to transformers' sdpa
function with the sdpa mask, so a model loaded with "varlen" chats like one loaded with "sdpa".
`model.attn_implementation: auto` (the default) picks varlen for packed training when the kernel runs
forward and backward on this GPU, in this dtype and head size, and agrees with the per-example
reference (`kernel_problem`), and sdpa otherwise, saying why on a GPU.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from roletune.errors import first_line

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

VARLEN = "varlen"


def register() -> None:
    """Make "varlen" a name transformers accepts (from_pretrained, set_attn_implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    # sdpa's mask, for the calls that fall back to sdpa: without a registered mask function transformers
    # would give the fallback no mask at all, and a padded batch would attend to its padding. roletune's
    # loss spares packed training batches the mask they do not need (without_mask_building).
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def loaded_as(choice: str) -> str:
    """The implementation to load the model with for model.attn_implementation=`choice` (auto loads as
    sdpa; `choose_for_packing` may switch it once the model is on its device)."""
    if choice == VARLEN:
        register()
    return "sdpa" if choice == "auto" else choice


def choose_for_packing(model, choice: str, packing: bool) -> str | None:
    """For choice "auto", switch a model loaded with sdpa to varlen when packed training can use it.
    Returns what was chosen on a GPU, and why (a line to show), else None."""
    if choice != "auto" or not packing:
        return None
    problem = kernel_problem(model.config, model.device, model.dtype)
    if problem is None:
        register()
        model.set_attn_implementation(VARLEN)
        return "attention: varlen (PyTorch's flash kernel, within each packed example)"
    return f"attention: sdpa, not varlen ({problem})" if model.device.type == "cuda" else None


def active(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def without_mask_building(model, inputs: dict) -> dict:
    """`inputs` for `model`'s forward with the attention mask of a packed batch (one row of examples, position
    ids restarting per example, no mask of its own) already given, 4-D, which transformers passes through as
    it is. Otherwise, as every forward starts, transformers checks the position ids for packed sequences,
    reading a value back from the GPU (the host waits there for the previous step to end), before it builds
    the mask. varlen attention keeps the examples apart by their boundaries: it gets an empty mask, which
    would fail, not mislead, if any attention used it. sdpa gets the block-diagonal causal mask transformers
    would build (the same booleans), made from the position ids on the device. Left to transformers:
    padded batches, models with sliding-window layers, other attention implementations."""
    if "attention_mask" in inputs or "position_ids" not in inputs:
        return inputs
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    kind = active(inner)
    ids = inputs["input_ids"]
    if kind == VARLEN and "cu_seq_lens_q" in inputs:
        return {**inputs, "attention_mask": ids.new_empty((1, 1, 0, 0), dtype=torch.bool)}
    if kind == "sdpa" and not _sliding(inner.config):
        return {**inputs, "attention_mask": packed_causal_mask(inputs["position_ids"])}
    return inputs


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, T, T) bool: token i attends to token j <= i of its own example, an example starting wherever the
    position does not follow the one before (transformers' find_packed_sequence_indices), without reading
    anything back."""
    first = position_ids[:, :1] - 1
    example = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def _sliding(config) -> bool:
    """Whether any layer attends within a sliding window (a mask transformers builds itself)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    if hasattr(config, "use_sliding_window"):  # Qwen2, Qwen3: a window only when asked for
        return bool(config.use_sliding_window)
    return getattr(config, "sliding_window", None) is not None  # Mistral and the like


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention-function signature: query (1, heads, T, head_dim), key and value
    (1, kv_heads, T, head_dim) in, (1, T, heads, head_dim) out."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    if dropout or sliding_window:
        raise ValueError("varlen attention has no attention dropout or sliding window; use "
                         "model.attn_implementation=sdpa for this model")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attend(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 cu_seq_lens_q, max_length_q, scale)
    return out.unsqueeze(0), None


def attend(query, key, value, cu_seq_lens, max_length: int, scale: float):
    """Causal attention within each example of a packed (T, heads, head_dim) batch whose examples end at
    cu_seq_lens[1:]: PyTorch's varlen flash kernel on CUDA, the per-example reference elsewhere."""
    if query.is_cuda and varlen_attn is not None:
        return flash_varlen(query, key, value, cu_seq_lens, max_length, scale)
    return per_example(query, key, value, cu_seq_lens, scale)


_options_of = (None, None)  # (kernel, its options), read once: inspect has no place in a compiled layer


def kernel_options() -> tuple[dict, bool, bool]:
    """How this torch's varlen_attn is asked for causal attention, and whether it takes GQA and a scale
    (torch 2.10 has is_causal=; later releases window_size=(-1, 0), enable_gqa= and scale=)."""
    global _options_of
    if _options_of[0] is not varlen_attn:
        parameters = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
        _options_of = (varlen_attn, (causal, "enable_gqa" in parameters, "scale" in parameters))
    return _options_of[1]


def flash_varlen(query, key, value, cu_seq_lens, max_length: int, scale: float):
    causal, takes_gqa, takes_scale = kernel_options()
    groups = query.shape[1] // key.shape[1]
    options = dict(causal)
    if groups > 1:
        if takes_gqa:
            options["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if takes_scale:
        options["scale"] = scale
    elif scale != query.shape[-1] ** -0.5:  # the kernel's fixed scale is 1/sqrt(head_dim)
        query = query * (scale * query.shape[-1] ** 0.5)
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)


def per_example(query, key, value, cu_seq_lens, scale: float):
    """The reference: sdpa on each example alone (reads the boundaries on the host)."""
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, length, head_dim)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


def kernel_problem(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the varlen kernel cannot train this model here, or None."""
    if varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if device.type != "cuda":
        return "the kernel runs on CUDA GPUs only"
    if getattr(config, "use_sliding_window", False) or getattr(config, "attention_dropout", 0.0):
        return "the model uses a sliding window or attention dropout"
    return probe(config, device, dtype)


def probe(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel forward and backward on a small packed batch shaped like the model's attention and
    compare it with the per-example reference in fp32: a kernel that refuses this dtype or head size, or
    computes something else, is caught here, before the run, not in it. None when it agrees."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = [5, 11, 8]
    cu_seq_lens = torch.tensor([0, 5, 16, 24], dtype=torch.int32, device=device)
    generator = torch.Generator(device).manual_seed(0)
    # Laid out as varlen_attention hands them over: heads-major, viewed as (tokens, heads, head_dim).
    q, k, v, grad = (torch.randn(n, sum(lengths), head_dim, device=device, dtype=dtype, generator=generator)
                     .transpose(0, 1) for n in (heads, kv_heads, kv_heads, heads))
    scale = head_dim ** -0.5
    try:
        got = _output_and_grads(lambda *qkv: flash_varlen(*qkv, cu_seq_lens, max(lengths), scale), q, k, v, grad)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        return f"the kernel failed: {first_line(exc, 160)}"
    want = _output_and_grads(lambda *qkv: per_example(*qkv, cu_seq_lens, scale),
                             q.float(), k.float(), v.float(), grad.float())
    for name, a, b in zip(("output", "query gradient", "key gradient", "value gradient"), got, want):
        error = (a.float() - b).abs().max().item()
        if not error <= 0.05 * max(b.abs().max().item(), 1.0):  # bf16 rounding is ~0.4%; a wrong mask is O(1)
            return f"the kernel's {name} differs from the reference by {error:.3g}"
    return None


def _output_and_grads(attention, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad
