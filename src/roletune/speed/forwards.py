"""A module's forward replaced through its class, so compiled code is shared between layers; and the module
whose forward every forward through a set of layers passes, for hooks that run once per forward.

Setting `module.forward` on each instance (a functools.partial per module) would work the same when run
eagerly, but torch.compile guards its code on what a module's forward is: a new object in every decoder
layer, so train.compile=layers compiled every layer on its own and, past torch._dynamo's recompile limit
(8), left the others eager. Here a module gets a subclass of its own class whose forward is the new one,
made once per (class, forward): every layer holds the same classes, so the layers share one compiled code.
"""
from __future__ import annotations

import functools

from torch import nn


def replace_forward(module: nn.Module, forward, prefix: str) -> None:
    """Make `forward(module, ...)` the forward of `module`; the one it replaces stays `module.plain_forward`."""
    module.__class__ = _subclass(type(module), forward, prefix)


@functools.cache
def _subclass(cls: type, forward, prefix: str) -> type:
    return type(prefix + cls.__name__, (cls,), {"forward": forward, "plain_forward": cls.forward,
                                               "__module__": forward.__module__})


def innermost_holder(model: nn.Module, modules: list) -> nn.Module:
    """The deepest module of `model` that holds every one of `modules` and is called (for a Qwen2 the decoder,
    model.model, and not its list of layers, which is only iterated): where hooks go that must run once as
    each forward through them starts or ends."""
    wanted = {id(module) for module in modules}
    holder = model
    while True:
        holders = [child for child in holder.children() if type(child).forward is not nn.Module.forward
                   and wanted <= {id(m) for m in child.modules()}]
        if len(holders) != 1:
            return holder
        holder = holders[0]
