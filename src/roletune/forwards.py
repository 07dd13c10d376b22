"""A module's forward replaced through its class, so compiled code is shared between layers.

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
