"""What recording CUDA graphs of the decoder layers needs, for training steps (layer_graphs) and decoding
steps (decode_graphs) alike: the tensors a layer call reads, a warm-up off the main stream, autocast without
its cache, and whether a recording is being made now (LoRA dropout then keeps its mask)."""
from __future__ import annotations

import contextlib

import torch

_capturing = False  # while a recording is made: roletune's LoRA dropout keeps its mask (see capturing())


@contextlib.contextmanager
def recording():
    """The block records a graph: capturing() says so inside it."""
    global _capturing
    _capturing = True
    try:
        yield
    finally:
        _capturing = False


def kv_cache(kwargs: dict):
    """The KV cache a decoder forward or layer is given, or None: `cache` since transformers 5.2x, before it
    `past_key_values`."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


@contextlib.contextmanager
def side_stream(device: str):
    """Run the block off the main stream and wait for it, as PyTorch's make_graphed_callables warms up before
    recording: lazy initialisations (cuBLAS workspaces, Triton kernels compiled for new shapes) must not happen
    inside a recording. Elsewhere than on CUDA, the block just runs."""
    if device != "cuda":
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capturing() -> bool:
    """Whether a graph of the layers is being recorded now (the RNG state cannot be saved and restored)."""
    return _capturing


def split(hidden_states, kwargs) -> tuple[list, list, tuple]:
    """The tensors the layers read (hidden states, RoPE's cos and sin, the boundaries, ...), where they came
    from, and the key a recording is made for: their shapes and dtypes, every other argument's value, and
    the autocast state."""
    names, tensors, fixed = ["hidden_states"], [hidden_states], []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            names.append(name)
            tensors.append(value)
        elif isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
            names.extend((name, i) for i in range(len(value)))
            tensors.extend(value)
        else:
            fixed.append((name, value))
    device = hidden_states.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    shapes = tuple((tuple(t.shape), t.dtype) for t in tensors)
    return names, tensors, (tuple(str(n) for n in names), shapes, tuple(fixed), autocast)


def unflatten(names: list, tensors: list) -> dict:
    given = {}
    for name, tensor in zip(names, tensors):
        if isinstance(name, tuple):
            given[name[0]] = (*given.get(name[0], ()), tensor)
        else:
            given[name] = tensor
    return given


def autocast_without_cache(device: str):
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)
