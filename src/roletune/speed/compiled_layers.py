"""The decoder layers compiled one by one with torch.compile (train.compile=layers)."""
from __future__ import annotations

import functools

import torch

from roletune.model import decoder_layers
from roletune.speed.forwards import replace_forward


def compile_decoder_layers(model, mode: str = "default") -> int:
    """torch.compile each decoder layer of `model` that is not checkpointed, on its own (regional
    compilation); returns how many.

    Whole-model compilation traces the model at once, the same decoder layer 28 times over for a 7B one;
    compiled one layer at a time, the layers share their compiled code (their weights are inputs to it,
    not constants): one graph in all. The first layer's input, the frozen embeddings' output, needs no
    gradient where every other layer's does, and torch.compile would compile that layer on its own (a
    second graph, about 40% more compile time on the CPU); so the embeddings' output is marked as needing
    one, which costs that layer's backward the input gradients of its projections (about 1% of a step's
    matmuls for 28 layers). Sequence lengths are marked dynamic up front: every packed micro-batch has a new
    length, and a shape-specialised code would recompile for each. The LoRA, lean-activation and
    dropout-recompute code runs inside the compiled region, the loss and the optimizer outside.
    Checkpointed layers stay eager: torch.compile captures next to nothing of a layer whose forward runs
    inside activation checkpointing (seen with transformers 5.24 and torch 2.13), so compiling them would
    only cost compile time. `mode` is torch.compile's (train.compile_mode).

    What is compiled is the layer's forward, not the whole call as Module.compile does: module hooks stay
    outside. transformers' output capture (which the reply-only loss uses for the final hidden states) hooks
    every layer with a read of a ContextVar, which torch.compile cannot trace; compiled with the layer, it
    split each one into three compiled pieces.
    """
    layers = decoder_layers(model)
    compiled = [layer for layer in layers if not layer.gradient_checkpointing]
    for layer in compiled:
        replace_forward(layer, _compiled_forward(type(layer), mode), "Compiled")
    if compiled and compiled[0] is layers[0]:
        model.get_input_embeddings().register_forward_hook(_needs_grad_in_training)
    return len(compiled)


def _needs_grad_in_training(module, args, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_()


@functools.cache
def _compiled_forward(layer_class: type, mode: str):
    return torch.compile(layer_class.forward, dynamic=True, mode=mode)  # one per class: the layers share it
