"""LoRA layers fed their activations as autocast gives them, not as fp32 copies (lora.dtype=auto)."""
from __future__ import annotations

import torch

from roletune.speed.forwards import innermost_holder


def keep_lora_inputs_under_autocast(model) -> None:
    """Under mixed precision, feed each LoRA layer its bf16/fp16 input instead of an fp32 copy.

    peft casts a LoRA layer's input to the adapter's dtype (fp32) before the two small matmuls. Under
    autocast those matmuls run in bf16/fp16 regardless, so the cast only materialises an fp32 copy of
    the activations in every adapted module (seven per decoder layer for the seed recipe), which autocast
    then casts back. peft's own bitsandbytes LoRA layers already skip the cast under autocast; this does
    the same for plain linear layers. The choice is made per forward, because the same model also runs
    without autocast (sample answers during training, CPU training, where Trainer enables no autocast)
    and then needs the cast; a checkpointed block's recomputation sees the same autocast state.

    It is made for every layer at once as the forward through them starts (forwards.innermost_holder),
    ahead of any other hook there: roletune.speed.lora_fused plans each layer's branch in its own hook at that
    point, from the flags set here. Set only as each layer is called, the first forward after a change of
    autocast state found the layers not yet called still casting, and planned (with lora.grouped, grouped)
    that forward's branches otherwise than the next ones'. Each layer still decides for itself when it is
    called on its own.
    """
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(_cast_input_unless_autocast)
    if layers:
        first = layers[0].get_base_layer()  # its weight tells the device without a walk of the module tree
        innermost_holder(model, layers).register_forward_pre_hook(
            lambda module, args: _set_input_casts(layers, first.weight.device.type), prepend=True)


def _cast_input_unless_autocast(layer, args) -> None:
    # Inside a model forward the decoder's hook has set this already; this serves calls of the layer alone.
    if args and isinstance(args[0], torch.Tensor):
        _set_input_casts((layer,), args[0].device.type)


def _set_input_casts(layers, device_type: str) -> None:
    cast = not torch.is_autocast_enabled(device_type)
    for layer in layers:
        if layer.cast_input_dtype_enabled != cast:  # Module.__setattr__ costs host time: only on a change
            layer.cast_input_dtype_enabled = cast
