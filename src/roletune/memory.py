"""Peak training memory, estimated from the model's config, and the choice it drives: gradient
checkpointing only when the run would not fit without it.

Neither transformers nor accelerate estimates the memory of a training step (accelerate's
`estimate-memory` scales the weights and leaves activations out), so the arithmetic is written
here, from what the Qwen2 decoder layer and peft's LoRA Linear actually keep for backward (sdpa
attention, Trainer's bf16 autocast, peft's fp32 adapters). Per token and decoder layer, with h = hidden_size,
I = intermediate_size, a = bytes per activation element (2 in bf16/fp16, 4 in fp32):

  RMSNorm x2          the fp32 copy of its input (it normalises in fp32)            2 x 4h
  sdpa attention      q, k and v with kv repeated to every head (a mask is always    4 x h a
                      present: padding or packed examples), and the output
  SwiGLU MLP          gate output (silu), silu output and up output (their product)  3 x I a
  each LoRA Linear    a copy of its input: peft casts it to the fp32 adapter dtype,  in x (a + 1 if dropout)
                      autocast casts that back for lora_A, and dropout keeps a 1-byte
                      mask; q, k, v, gate and up read h, o reads h, down reads I
  frozen base Linear  nothing: only a weight gradient would need its input

For the seed recipe on Qwen2.5-7B in bf16 (r=8, seven adapted projections, dropout 0.1) that is
34h + 9I = 292 KB per token per layer, 8.2 MB per token over 28 layers. With checkpointing
each layer keeps only its input (h a per token) and rebuilds one layer's activations at a
time in backward. The loss costs 12 bytes per logit at its peak (the fp32 log-softmax kept for
backward, the fp32 gradient flowing into it and the one it produces), over the positions whose
logits are computed (all of them, or only the labelled ones with train.reply_logits_only).
The logits are freed before backward reaches the last decoder layer, so the loss peak and the
rebuilt layer are not added: peak = weights + LoRA state + kept activations +
max(logits, rebuilt layer) + workspace.

Checked against two peaks measured on an H200 (Qwen2.5-7B, bf16, huanhuan data, the seed's
padded batches, HF Trainer + peft LoRA r=8 on seven projections, dropout 0.1, logits over all
positions; the largest padded batch holds batch_size x 249 tokens, the longest example):
  batch 4, checkpointing:     measured 16.5 GiB, estimated 16.6 GiB (+0.8%)
  batch 16, no checkpointing: measured 51.7 GiB, estimated 51.9 GiB (+0.5%)
Not modelled: eager attention (it keeps the heads x T x T probabilities: far more), flash
attention (it keeps k and v unrepeated: a little less), FSDP / DeepSpeed sharding of the frozen
weights (the estimate is then per process as if unsharded: an overestimate), and the CPU's
dropout, which keeps a float mask where CUDA keeps a 1-byte one (CPU runs never checkpoint on
their own, so only the printed figure is affected).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from roletune.tokenize import IGNORE_INDEX

GiB = 2**30
# cuBLAS/cuBLASLt workspaces, the rotary tables, masks, labels and other small buffers.
WORKSPACE_BYTES = 256 * 2**20
# Of a GPU's memory, what a run may plan to use: the rest covers the CUDA context, the caching
# allocator's fragmentation and the estimate's own error.
USABLE_FRACTION = 0.9
LOGIT_BYTES = 12  # fp32 log-softmax output + the fp32 gradient into it + the one it returns
ADAPTER_BYTES = 4 + 4 + 8  # per LoRA parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
QUANTIZED_BYTES = {"4bit": 0.5 + 4 / 64, "8bit": 1.0}  # per decoder Linear weight; 4-bit keeps an fp32 absmax per 64
QUANTIZATIONS = (None, *QUANTIZED_BYTES)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a Llama-family config (Qwen2, Llama, Mistral)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2 always has q/k/v biases; Llama says so in attention_bias

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)),
                   bool(getattr(config, "attention_bias", config.model_type == "qwen2")))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in a decoder layer."""
        h, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    def layer_linear_parameters(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    def other_parameters(self) -> int:
        """Embeddings, LM head, norms and biases: what 4-/8-bit loading leaves in the model dtype."""
        biases = self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim if self.qkv_bias else 0
        per_layer = biases + 2 * self.hidden
        heads = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + heads + self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_linear_parameters() + self.other_parameters()


@dataclass(frozen=True)
class Estimate:
    """Peak training memory in bytes, by part; see the module docstring for the arithmetic."""
    weights: int             # the frozen base model
    adapter: int             # LoRA weights, gradients and AdamW moments
    kept_activations: int    # kept from forward until backward: every layer's, or each layer's input
    rebuilt_layer: int       # with checkpointing, one layer's activations rebuilt during backward
    logits: int              # the loss at its peak, at the start of backward
    workspace: int
    checkpointing: bool

    @property
    def peak(self) -> int:
        return (self.weights + self.adapter + self.kept_activations + max(self.logits, self.rebuilt_layer)
                + self.workspace)

    def parts(self) -> str:
        """The sum behind `peak`, in GiB."""
        loss = (f"max(logits {self.logits / GiB:.1f}, rebuilt layer {self.rebuilt_layer / GiB:.1f})"
                if self.checkpointing else f"logits {self.logits / GiB:.1f}")
        return (f"weights {self.weights / GiB:.1f} + LoRA {self.adapter / GiB:.1f} + activations "
                f"{self.kept_activations / GiB:.1f} + {loss} + workspace {self.workspace / GiB:.1f} GiB")


def estimate(model_config, lora, dtype: torch.dtype, tokens_per_microbatch: int, labelled_positions: int,
             checkpointing: bool, quantization: str | None = None) -> Estimate:
    """Peak memory of one training micro-batch of `tokens_per_microbatch` tokens (padding included)
    whose logits are computed at `labelled_positions` positions.

    `model_config` is the base model's transformers config; `lora` has r, dropout and target_modules;
    `dtype` is the weights' dtype; `quantization` None, "4bit" or "8bit" (bitsandbytes, decoder Linears only).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    shape = Shape.of(model_config)
    size = torch.empty((), dtype=dtype).element_size()
    targets = {name: dims for name, dims in shape.linears().items() if name in adapted_modules(lora)}
    per_layer = layer_activation_bytes(shape, targets, size, lora.dropout > 0)
    final_norm = 4 * shape.hidden  # the last RMSNorm is outside the checkpointed layers
    if checkpointing:
        kept = tokens_per_microbatch * (shape.layers * shape.hidden * size + final_norm)
        rebuilt = tokens_per_microbatch * per_layer
    else:
        kept = tokens_per_microbatch * (shape.layers * per_layer + final_norm)
        rebuilt = 0
    adapter = shape.layers * sum(lora.r * (i + o) for i, o in targets.values()) * ADAPTER_BYTES
    return Estimate(weights=weight_bytes(shape, size, quantization), adapter=adapter, kept_activations=kept,
                    rebuilt_layer=rebuilt, logits=labelled_positions * shape.vocab * LOGIT_BYTES,
                    workspace=WORKSPACE_BYTES, checkpointing=checkpointing)


def adapted_modules(lora) -> list[str]:
    return ALL_LINEAR if lora.target_modules == ["all-linear"] else lora.target_modules


def layer_activation_bytes(shape: Shape, targets: dict[str, tuple[int, int]], size: int, dropout: bool) -> int:
    """Bytes one decoder layer keeps for backward, per token (the table in the module docstring)."""
    norms = 2 * 4 * shape.hidden
    attention = 4 * shape.heads * shape.head_dim * size + 4 * shape.heads  # + sdpa's fp32 logsumexp
    mlp = 3 * shape.intermediate * size
    # fp32 without dropout keeps the input itself, shared by q/k/v: counted per module, a small overestimate.
    adapters = sum(i for i, _ in targets.values()) * (size + (1 if dropout else 0))
    return norms + attention + mlp + adapters


def weight_bytes(shape: Shape, size: int, quantization: str | None) -> int:
    linear = shape.layers * shape.layer_linear_parameters()
    if quantization is None:
        return (linear + shape.other_parameters()) * size
    # bitsandbytes quantizes the decoder's Linear layers; embeddings, LM head and norms stay in the model dtype.
    return round(linear * QUANTIZED_BYTES[quantization]) + shape.other_parameters() * size


def worst_microbatch(examples, batch_size: int, packing: bool, reply_logits_only: bool) -> tuple[int, int]:
    """(tokens, logit positions) of the largest micro-batch the data can make.

    Packed: the `batch_size` longest examples in one row. Padded: `batch_size` rows as long as the
    longest. The logits cover every position, or with reply_logits_only the labelled ones (padded:
    a column is computed for every row when any row has a label there).
    """
    longest = sorted((len(e.input_ids) for e in examples), reverse=True)[:batch_size]
    trained = (sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    labelled = sorted(trained, reverse=True)[:batch_size]
    tokens = sum(longest) if packing else len(longest) * longest[0]
    if not reply_logits_only:
        return tokens, tokens
    return tokens, sum(labelled) if packing else len(longest) * min(longest[0], sum(labelled))


def usable_bytes(device: torch.device, budget_gib: float | None) -> int | None:
    """USABLE_FRACTION of the GPU's total memory, or of train.memory_budget_gib (capped by the GPU) when set;
    None on the CPU without a budget.

    The card's total, not its free memory: every process of a launch, and a resumed run on the same
    card, decide alike.
    """
    total = round(budget_gib * GiB) if budget_gib is not None else None
    if device.type == "cuda":
        card = torch.cuda.get_device_properties(device).total_memory
        total = card if total is None else min(total, card)
    return None if total is None else round(total * USABLE_FRACTION)


@dataclass(frozen=True)
class Decision:
    """train.gradient_checkpointing resolved for this device and data, with the figures behind it."""
    checkpointing: bool
    with_it: Estimate
    without: Estimate
    usable: int | None
    setting: bool | str
    on_gpu: bool

    @property
    def estimate(self) -> Estimate:
        return self.with_it if self.checkpointing else self.without

    def line(self) -> str:
        state = "on" if self.checkpointing else "off"
        if self.setting != "auto":
            tight = self.on_gpu and self.usable is not None and self.estimate.peak > self.usable
            hint = ": it may run out of memory; train.gradient_checkpointing=auto would decide" if tight else ""
            return (f"gradient checkpointing: {state} (train.gradient_checkpointing={str(self.setting).lower()}; "
                    f"estimated peak {gib(self.estimate.peak)}{self._of_usable()}{hint})")
        if not self.on_gpu:
            return (f"gradient checkpointing: off (auto never checkpoints on the CPU; estimated peak "
                    f"{gib(self.without.peak)})")
        if self.checkpointing:
            return (f"gradient checkpointing: on (estimated peak without it {gib(self.without.peak)} > "
                    f"{gib(self.usable)} usable; with it {gib(self.with_it.peak)})")
        return f"gradient checkpointing: off (estimated peak {gib(self.without.peak)}{self._of_usable()})"

    def _of_usable(self) -> str:
        return f" of {gib(self.usable)} usable" if self.usable is not None else ""


def decide(setting: bool | str, with_it: Estimate, without: Estimate, usable: int | None, on_gpu: bool) -> Decision:
    """auto: checkpoint when the run without it would not fit the usable memory.

    Never on the CPU: there the activations live in host RAM, shared with the rest of the machine
    and stretched by swap, so there is no device total to hold the estimate against; CPU runs are
    the small ones (the demo, tests); and rebuilding every layer would add about a third to the
    compute of the slowest device.
    """
    if setting != "auto":
        checkpointing = bool(setting)
    else:
        checkpointing = on_gpu and usable is not None and without.peak > usable
    return Decision(checkpointing, with_it, without, usable, setting, on_gpu)


def for_run(cfg, examples, device: torch.device, dtype: torch.dtype, model_config=None,
            on_gpu: bool | None = None) -> Decision:
    """The decision for `cfg` training on `examples`; `on_gpu` defaults to the device's kind."""
    from roletune.model import load_model_config

    from roletune.distributed import sharded

    t = cfg.train
    model_config = model_config if model_config is not None else load_model_config(cfg.model)
    tokens, positions = worst_microbatch(examples, t.batch_size, t.packing, t.reply_logits_only)
    if t.reply_logits_only and t.lm_head_loss != "full" and not sharded(cfg):
        positions = min(positions, t.loss_chunk)  # the chunked (or fused) head holds one chunk's logits at a time
    quantization = None if cfg.model.quantization == "none" else cfg.model.quantization
    with_it, without = (estimate(model_config, cfg.lora, dtype, tokens, positions, checkpointing, quantization)
                        for checkpointing in (True, False))
    on_gpu = device.type == "cuda" if on_gpu is None else on_gpu
    return decide(t.gradient_checkpointing, with_it, without, usable_bytes(device, t.memory_budget_gib), on_gpu)


def plan_lines(cfg, examples, device: torch.device) -> list[str]:
    """The dry run's memory plan: for the configured device or, on the CPU with train.memory_budget_gib
    set, for a GPU of that size (where dtype auto means bf16)."""
    from roletune.model import DTYPES, resolve_dtype

    for_gpu = device.type == "cuda" or cfg.train.memory_budget_gib is not None
    dtype = (torch.bfloat16 if for_gpu and device.type != "cuda" and cfg.model.dtype == "auto"
             else resolve_dtype(cfg.model.dtype, device))
    decision = for_run(cfg, examples, device, dtype, on_gpu=for_gpu)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    where = f"a GPU with {gib(decision.usable)} usable" if for_gpu else "the CPU"
    lines = [f"memory (estimated, {name} on {where}): peak {gib(decision.without.peak)} without gradient "
             f"checkpointing, {gib(decision.with_it.peak)} with it",
             f"  without: {decision.without.parts()}",
             f"  with:    {decision.with_it.parts()}",
             decision.line()]
    if not for_gpu:
        lines.append("set train.memory_budget_gib=N to plan for a GPU with N GiB")
    return lines


def gib(count: int | None) -> str:
    return f"{count / GiB:.1f} GiB"
