"""A stand-in for torch.cuda.CUDAGraph on the CPU, with a CUDA graph's semantics.

EmulatedGraph records the operators run while capturing, with the very tensors they read and wrote, and a
replay runs them again on those tensors. A replay therefore sees what a CUDA graph's would: the memory that
was captured, changed in place since, but never a tensor made since (a stale adapter copy, a gradient set
anew, an input not copied in). Capturing changes no tensor that existed before (a CUDA graph runs nothing
while recording), nor fails on an index that only a running kernel checks, and reading a value back to the
host while capturing fails, as it does on a GPU. The recording itself (torch.cuda.CUDAGraph) is what only a
GPU can check (benchmarks/graph_check.py).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class EmulatedGraph:
    def __init__(self):
        self.ops = []

    @contextlib.contextmanager
    def capture(self):
        with _Recorder(self.ops):
            yield

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, kept in self.ops:
                result = func(*args, **kwargs)
                for new, old in zip(tree_leaves(result), tree_leaves(kept)):
                    if isinstance(old, torch.Tensor) and not _same_memory(new, old):
                        old.copy_(new)


def _same_memory(a, b) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops, self.made = ops, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError(f"{func}: a value read back to the host while capturing")
        older = [t for t in _written(func, args, kwargs) if t.untyped_storage().data_ptr() not in self.made]
        before = [t.clone() for t in older]
        try:
            out = func(*args, **kwargs)
        except IndexError:
            # An index a GPU checks only as the kernel runs (a KV cache's last slot written, the step after
            # it recorded): a capture, which runs nothing, does not fail on it; a replay would.
            if not (func._schema.is_mutable and older):
                raise
            out = args[0]
        for tensor, value in zip(older, before):  # capturing runs nothing
            tensor.copy_(value)
        self.made.update(t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((func, args, kwargs, out))
        return out


def _written(func, args, kwargs) -> list:
    tensors = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        tensors += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return tensors


def graphs_on_the_cpu(monkeypatch) -> list:
    """roletune.speed.layer_graphs installing stand-in graphs where it would refuse for want of a GPU (their training
    steps still subject to its other checks); returns the runners it installs, in order."""
    from roletune.speed import layer_graphs

    runners, install = [], layer_graphs.install

    def install_emulated(model, new_graph=None, training=True):
        runners.append(install(model, EmulatedGraph, training))
        return runners[-1]
    monkeypatch.setattr(layer_graphs, "decoding_refusal", lambda *args: None)
    monkeypatch.setattr(layer_graphs, "install", install_emulated)
    return runners
