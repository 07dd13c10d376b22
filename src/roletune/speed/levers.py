"""Every lever, applied in the one order they compose in: the single entry point for the engine
(`for_training`) and for the verbs that decode (`for_decoding`).

For training, on the base model as loaded, then with LoRA on it:
1. attention: varlen for packed micro-batches where the GPU and model allow it (model.attn_implementation);
2. Liger-Kernel's layers (train.liger_kernels), which take norms, MLPs and rotary embeddings as they are;
3. lean activations (train.lean_activations) for the norms and MLPs Liger did not take;
4. LoRA (roletune.model.apply_lora), the first decoder layers checkpointed as memory planning decided;
5. LoRA inputs as autocast gives them (lora.dtype=auto): the flags the fused branch plans from;
6. LoRA dropout recomputed in backward (lora.recompute_dropout);
7. the fused LoRA branch (lora.fused), grouped (lora.grouped): it reads the dropout and casts set above;
8. the decoder layers compiled one by one (train.compile=layers), each as 1-7 left it;
9. CUDA graphs (train.cuda_graphs) last: they record the layers as they finally run, and refuse
   where an earlier choice rules them out (checkpointed layers, no varlen, compiled layers).
Each returns the line to show, if any; docs/speed.md has what each measured and how to turn it off.
"""
from __future__ import annotations

from roletune.model import apply_lora
from roletune.speed import attention, layer_graphs, liger_layers
from roletune.speed.compiled_layers import compile_decoder_layers
from roletune.speed.lean_activations import make_lean
from roletune.speed.lora_dropout import recompute_lora_dropout
from roletune.speed.lora_fused import fuse_lora_layers
from roletune.speed.lora_grouped import fuse_lora
from roletune.speed.lora_inputs import keep_lora_inputs_under_autocast


def for_training(base, cfg, *, checkpointed_layers: int = 0, sharded: bool = False, world_size: int = 1,
                 echo=print):
    """`base` (a transformers model on its device) with LoRA and this run's levers; returns the peft model.
    sharded: the weights will be spread over the ranks (FSDP, DeepSpeed), where the fused branch is untried."""
    t, lora = cfg.train, cfg.lora
    for line in (attention.choose_for_packing(base, cfg.model.attn_implementation, t.packing),
                 liger_layers.use_kernels(base, t.liger_kernels, t.compile)):
        if line:
            echo(line)
    if t.lean_activations:
        make_lean(base)
    model = add_lora(base, lora, checkpointed_layers)
    if lora.fused and not sharded:
        fuse_lora(model, grouped=lora.grouped)
    if t.compile == "layers":
        count = compile_decoder_layers(model, t.compile_mode)
        echo(f"torch.compile ({t.compile_mode}): {count} decoder layers, compiled during the first steps")
    if t.cuda_graphs:
        echo(layer_graphs.graph_layers(model, cfg, world_size))
    return model


def add_lora(base, lora_cfg, checkpointed_layers: int = 0):
    """Steps 4-6: LoRA on `base` as roletune trains it (the LoRA stage of `for_training`)."""
    model = apply_lora(base, lora_cfg, checkpointed_layers)
    if lora_cfg.dtype == "auto":
        keep_lora_inputs_under_autocast(model)
    if lora_cfg.recompute_dropout and lora_cfg.dtype != "fp32":  # fp32 adapters copy their input anyway
        recompute_lora_dropout(model)
    return model


def for_decoding(model, *, fused: bool = True, cuda_graphs: bool = False, echo=print) -> None:
    """The levers that serve answering: the fused LoRA branch (fewer kernels and less Python per token than
    peft's forward; merge turns it off to check against peft's), and decoding steps replayed from CUDA
    graphs where they can be (saying whether)."""
    if fused:
        fuse_lora_layers(model)
    if cuda_graphs:
        echo(layer_graphs.graph_decoding(model))


def training_from_graphs(model) -> bool:
    """Whether the training steps of `model` replay CUDA graphs (and its micro-batches are padded for them)."""
    return layer_graphs.graphs_training(model)


def decodes_from_graphs(model) -> bool:
    return layer_graphs.installed(model)


def graphs_summary(model) -> dict | None:
    """What the CUDA graphs of `model` did (train_summary.json's cuda_graphs), or None where it has none."""
    return layer_graphs.summary(model)
