"""Peak training memory, estimated from the model's config and this run's largest micro-batch, and the
choice it drives: gradient checkpointing for as few decoder layers as the run needs to fit.

Neither transformers nor accelerate estimates the memory of a training step (accelerate's
`estimate-memory` scales the weights and leaves activations out), so the arithmetic is written
here, from what the Qwen2 decoder layer and peft's LoRA Linear actually keep for backward (sdpa
attention, Trainer's bf16 autocast, peft's fp32 adapters). Per token and decoder layer, with h = hidden_size,
I = intermediate_size, a = bytes per activation element (2 in bf16/fp16, 4 in fp32):

  RMSNorm x2          the fp32 copy of its input (it normalises in fp32) and the     2 x (4h + 4)
                      fp32 1/rms; lean (train.lean_activations): the input itself    2 x (h a + 4)
                      and the 1/rms
  sdpa attention      q, k and v with kv repeated to every head (a mask is always    4 x h a
                      present: padding or packed examples), and the output
  SwiGLU MLP          gate output (silu), silu output and up output (their product)  3 x I a
                      lean: gate and up output only, silu rebuilt in backward       2 x I a
  each LoRA Linear    peft's own path (lora.dtype=fp32, or dropout not recomputed):  in x (a + 1 if dropout)
                      a copy of its input (peft casts it to the fp32 adapter dtype,
                      autocast casts that back for lora_A, or dropout makes one) and
                      dropout's 1-byte mask; q, k, v, gate and up read h, o reads h,
                      down reads I
  LoRA inputs         roletune's default (lora.dtype=auto, dropout redrawn in       (3h + I) a
                      backward, see roletune.speed.lora_dropout): each input once, shared
                      by the projections that read it
  frozen base Linear  nothing: only a weight gradient would need its input

For the seed recipe on Qwen2.5-7B in bf16 (r=8, seven adapted projections, dropout 0.1) as peft runs
it, that is 34h + 9I (and 8 bytes of 1/rms) = 292 KB per token per layer, 8.2 MB per token over 28
layers; roletune's LoRA path keeps 22h + 8I = 230 KB, and with lean RMSNorm and SwiGLU (its default,
see roletune.speed.lean_activations) 18h + 6I = 178 KB. A checkpointed layer keeps only its input (h a per
token) and rebuilds its activations in backward, one layer at a time. Checkpointing is per layer:
with k of the L layers checkpointed (the first k), the kept activations are k x (input) + (L - k) x
(all of the above), plus one rebuilt layer when k > 0; `auto` picks the smallest k whose peak fits,
since every rebuilt layer costs another forward pass through it. The loss costs 12 bytes per logit
at its peak (the fp32 log-softmax kept for backward, the fp32 gradient flowing into it and the one it
produces), over the positions whose logits are computed (all of them, or only the labelled ones with
train.reply_logits_only). The logits are freed before backward reaches the last decoder layer, so
the loss peak and the rebuilt layer are not added:
peak = weights + LoRA state + kept activations + max(logits, rebuilt layer) + workspace.
(With 0 < k < L the rebuilds come after backward has freed the last L - k layers, so the rebuilt
layer then only makes the figure an upper bound.)

The micro-batch is the largest one this run will train on: Trainer's order is reproduced (a seeded
permutation per epoch, dealt to the processes one micro-batch each, see epoch_order.training_order)
and the largest micro-batch in tokens and the largest in logit positions are taken over every
micro-batch of the planned epochs or max_steps. A random micro-batch of role-play lines is far
smaller than the batch_size longest examples together, the bound used when the order is not
reproduced (a sampling strategy not modelled there): for huanhuan, 16 per micro-batch, 3 epochs,
packed, 1,391 tokens against 3,207.

Checked against two peaks measured on an H200 (Qwen2.5-7B, bf16, huanhuan data, the seed's
padded batches, HF Trainer + peft LoRA r=8 on seven projections, dropout 0.1, logits over all
positions; the largest padded batch holds batch_size x 249 tokens, the longest example):
  batch 4, all 28 layers checkpointed: measured 16.5 GiB, estimated 16.6 GiB (+0.8%)
  batch 16, no checkpointing:          measured 51.7 GiB, estimated 51.9 GiB (+0.5%)
Not modelled: eager attention (it keeps the heads x T x T probabilities: far more), flash
attention (it keeps k and v unrepeated: a little less), FSDP / DeepSpeed sharding of the frozen
weights (the estimate is then per process as if unsharded: an overestimate), and the CPU's
dropout, which keeps a float mask where CUDA keeps a 1-byte one (CPU runs never checkpoint on
their own, so only the printed figure is affected).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from roletune.data.tokenize import IGNORE_INDEX
from roletune.model import SHARED_INPUTS

GiB = 2**30
# cuBLAS/cuBLASLt workspaces, the rotary tables, masks, labels and other small buffers.
WORKSPACE_BYTES = 256 * 2**20
# Of a GPU's memory, what a run may plan to use: the rest covers the CUDA context, the caching
# allocator's fragmentation and the estimate's own error.
USABLE_FRACTION = 0.9
LOGIT_BYTES = 12  # fp32 log-softmax output + the fp32 gradient into it + the one it returns
ADAPTER_TRAINING_BYTES = 4 + 4 + 8  # per LoRA parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
# Per decoder Linear weight. NF4 with double quantisation: a 4-bit code, a uint8 absmax per block of 64
# and an fp32 absmax per 256 of those. LLM.int8: an int8 code (and an fp32 scale per output row).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
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
    kept_activations: int    # kept from forward until backward: a layer's all, or a checkpointed layer's input
    rebuilt_layer: int       # with any layer checkpointed, one layer's activations rebuilt during backward
    logits: int              # the loss at its peak, at the start of backward
    workspace: int
    checkpointed_layers: int  # the first this many decoder layers

    @property
    def peak(self) -> int:
        return (self.weights + self.adapter + self.kept_activations + max(self.logits, self.rebuilt_layer)
                + self.workspace)

    def parts(self) -> str:
        """The sum behind `peak`, in GiB."""
        loss = (f"max(logits {self.logits / GiB:.1f}, rebuilt layer {self.rebuilt_layer / GiB:.1f})"
                if self.checkpointed_layers else f"logits {self.logits / GiB:.1f}")
        return (f"weights {self.weights / GiB:.1f} + LoRA {self.adapter / GiB:.1f} + activations "
                f"{self.kept_activations / GiB:.1f} + {loss} + workspace {self.workspace / GiB:.1f} GiB")


def estimate(model_config, lora, dtype: torch.dtype, tokens_per_microbatch: int, labelled_positions: int,
             checkpointed_layers: int, quantization: str | None = None, lean: bool = False,
             graphed: bool = False) -> Estimate:
    """Peak memory of one training micro-batch of `tokens_per_microbatch` tokens (padding included)
    whose logits are computed at `labelled_positions` positions, with the first `checkpointed_layers`
    decoder layers checkpointed (0 to num_hidden_layers).

    `model_config` is the base model's transformers config; `lora` has r, dropout and target_modules;
    `dtype` is the weights' dtype; `quantization` None, "4bit" or "8bit" (bitsandbytes, decoder Linears only);
    `lean` whether RMSNorm and SwiGLU keep only their inputs (train.lean_activations); `graphed` whether the
    layers replay CUDA graphs (train.cuda_graphs), where LoRA dropout keeps its masks.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    shape = Shape.of(model_config)
    if isinstance(checkpointed_layers, bool) or not 0 <= checkpointed_layers <= shape.layers:
        raise ValueError(f"checkpointed_layers={checkpointed_layers!r}: expected a count from 0 to {shape.layers}")
    size = torch.empty((), dtype=dtype).element_size()
    targets = {name: dims for name, dims in shape.linears().items() if name in adapted_modules(lora)}
    per_layer = layer_activation_bytes(shape, targets, size, lora, lean, graphed)
    final_norm = norm_bytes(shape, size, lean)  # the last RMSNorm is outside the checkpointed layers
    full_layers = shape.layers - checkpointed_layers
    kept = tokens_per_microbatch * (checkpointed_layers * shape.hidden * size + full_layers * per_layer + final_norm)
    rebuilt = tokens_per_microbatch * per_layer if checkpointed_layers else 0
    adapter = shape.layers * sum(lora.r * (i + o) for i, o in targets.values()) * ADAPTER_TRAINING_BYTES
    return Estimate(weights=weight_bytes(shape, size, quantization), adapter=adapter, kept_activations=kept,
                    rebuilt_layer=rebuilt, logits=labelled_positions * shape.vocab * LOGIT_BYTES,
                    workspace=WORKSPACE_BYTES, checkpointed_layers=checkpointed_layers)


def adapted_modules(lora) -> list[str]:
    return ALL_LINEAR if lora.target_modules == ["all-linear"] else lora.target_modules


def layer_activation_bytes(shape: Shape, targets: dict[str, tuple[int, int]], size: int, lora,
                           lean: bool = False, graphed: bool = False) -> int:
    """Bytes one decoder layer keeps for backward, per token (the table in the module docstring)."""
    norms = 2 * norm_bytes(shape, size, lean)
    attention = 4 * shape.heads * shape.head_dim * size + 4 * shape.heads  # + sdpa's fp32 logsumexp
    mlp = (2 if lean else 3) * shape.intermediate * size
    return norms + attention + mlp + lora_input_bytes(targets, size, lora, graphed)


def norm_bytes(shape: Shape, size: int, lean: bool) -> int:
    """What one RMSNorm keeps per token: an fp32 copy of its input (lean: the input itself) and an fp32 1/rms."""
    return (shape.hidden * size if lean else 4 * shape.hidden) + 4


def lora_input_bytes(targets: dict[str, tuple[int, int]], size: int, lora, graphed: bool = False) -> int:
    """What the LoRA layers keep of their inputs for lora_A's backward, per token. `graphed`: in CUDA graphs
    (roletune.speed.layer_graphs) dropout keeps its masks, 8 elements a byte in the fused branch, and without it its
    dropped copies and 1-byte masks."""
    dropout = lora.dropout > 0
    if lora.dtype == "fp32" or (dropout and not lora.recompute_dropout) or (graphed and dropout and not lora.fused):
        # A copy per projection: peft's fp32 cast (autocast hands lora_A a 16-bit copy of it) or the
        # dropped-out input, plus a 1-byte mask with dropout. Without dropout the fp32 cast keeps one copy
        # per projection too.
        return sum(i for i, _ in targets.values()) * (size + (1 if dropout else 0))
    # The input itself, once per tensor (roletune.speed.lora_dropout redraws the dropout in backward).
    read = [next((targets[name][0] for name in names if name in targets), 0) for names in SHARED_INPUTS]
    masks = sum(-(-i // 8) for i, _ in targets.values()) if graphed and dropout else 0
    return sum(read) * size + masks


def weight_bytes(shape: Shape, size: int, quantization: str | None) -> int:
    linear = shape.layers * shape.layer_linear_parameters()
    if quantization is None:
        return (linear + shape.other_parameters()) * size
    # bitsandbytes quantizes the decoder's Linear layers; embeddings, LM head and norms stay in the model dtype.
    return round(linear * QUANTIZED_BYTES[quantization]) + shape.other_parameters() * size


@dataclass(frozen=True)
class MicroBatch:
    """The micro-batch the estimate is sized for."""
    tokens: int      # padding included
    positions: int   # positions whose logits are computed
    in_order: bool   # the largest of this run's data order; False: of any order (the longest examples together)

    def describe(self) -> str:
        where = ("the largest micro-batch of this run's data order" if self.in_order else
                 "the longest examples in one micro-batch (Trainer's data order is not reproduced for this "
                 "sampling strategy)")
        return f"{where}: {self.tokens:,d} tokens, logits at {self.positions:,d} positions"


class _Sizes:
    """What a micro-batch's size needs from each example (the last entry is epoch_order.WithFiller's
    filler: one token, no label)."""

    def __init__(self, examples, packing: bool, reply_logits_only: bool):
        self.packing, self.reply_logits_only = packing, reply_logits_only
        self.lengths = [len(e.input_ids) for e in examples] + [1]
        # The loss reads labels[1:]: position p predicts token p + 1 (packed: each example's first label is dropped).
        self.trained = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples] + [0]
        # Padded rows: each example's labelled positions as the bits of an int, to take their union per batch.
        self.columns = [_position_bits(e.labels[1:]) for e in examples] + [0] if reply_logits_only and not packing \
            else None

    def of(self, batch: list[int]) -> tuple[int, int]:
        """(tokens, logit positions) of the micro-batch of these example indices, as the collators build it."""
        if self.packing:
            tokens = sum(self.lengths[i] for i in batch)
            return tokens, sum(self.trained[i] for i in batch) if self.reply_logits_only else tokens
        tokens = len(batch) * max(self.lengths[i] for i in batch)  # rows padded on the right to the longest
        if not self.reply_logits_only:
            return tokens, tokens
        columns = 0  # batching.labelled_positions: a column is computed for every row when any row has a label there
        for i in batch:
            columns |= self.columns[i]
        return tokens, len(batch) * columns.bit_count()


def _position_bits(labels) -> int:
    return int("".join("1" if label != IGNORE_INDEX else "0" for label in reversed(labels)) or "0", 2)


def worst_microbatch(examples, batches, packing: bool, reply_logits_only: bool) -> MicroBatch:
    """The most tokens and the most logit positions over `batches` (lists of example indices; index
    len(examples) is the distributed filler). Each maximum is reached by some micro-batch; together
    they bound every one."""
    sizes = _Sizes(examples, packing, reply_logits_only)
    tokens, positions = 0, 0
    for batch in batches:
        batch_tokens, batch_positions = sizes.of(batch)
        tokens, positions = max(tokens, batch_tokens), max(positions, batch_positions)
    return MicroBatch(tokens, positions, in_order=True)


def largest_possible_microbatch(examples, batch_size: int, packing: bool, reply_logits_only: bool) -> MicroBatch:
    """A bound over any order: the `batch_size` longest examples in one micro-batch.

    Packed: in one row. Padded: `batch_size` rows as long as the longest. The logits cover every
    position, or with reply_logits_only the labelled ones (padded: a column is computed for every
    row when any row has a label there).
    """
    longest = sorted((len(e.input_ids) for e in examples), reverse=True)[:batch_size]
    trained = (sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    labelled = sorted(trained, reverse=True)[:batch_size]
    tokens = sum(longest) if packing else len(longest) * longest[0]
    if not reply_logits_only:
        return MicroBatch(tokens, tokens, in_order=False)
    positions = sum(labelled) if packing else len(longest) * min(longest[0], sum(labelled))
    return MicroBatch(tokens, positions, in_order=False)


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
    layers: int                        # decoder layers to checkpoint: the first this many
    estimates: tuple[Estimate, ...]    # estimates[k]: the peak with the first k layers checkpointed
    usable: int | None
    setting: bool | str
    on_gpu: bool
    microbatch: MicroBatch

    @property
    def checkpointing(self) -> bool:
        return self.layers > 0

    @property
    def total_layers(self) -> int:
        return len(self.estimates) - 1

    @property
    def estimate(self) -> Estimate:
        return self.estimates[self.layers]

    @property
    def without(self) -> Estimate:
        return self.estimates[0]

    @property
    def with_all(self) -> Estimate:
        return self.estimates[-1]

    def state(self) -> str:
        if not self.layers:
            return "off"
        if self.layers == self.total_layers:
            return f"all {self.layers} layers"
        return f"{self.layers} of {self.total_layers} layers"

    def line(self) -> str:
        order = "" if self.microbatch.in_order else "; sized for the longest examples together: data order not modelled"
        tight = self.on_gpu and self.usable is not None and self.estimate.peak > self.usable
        if self.setting != "auto":
            hint = ": it may run out of memory; train.gradient_checkpointing=auto would decide" if tight else ""
            return (f"gradient checkpointing: {self.state()} (train.gradient_checkpointing="
                    f"{str(self.setting).lower()}; estimated peak {gib(self.estimate.peak)}{self._of_usable()}"
                    f"{hint}{order})")
        if not self.on_gpu:
            return (f"gradient checkpointing: off (auto never checkpoints on the CPU; estimated peak "
                    f"{gib(self.without.peak)}{order})")
        if not self.layers:
            return f"gradient checkpointing: off (estimated peak {gib(self.without.peak)}{self._of_usable()}{order})"
        versus = ">" if tight else "of"
        hint = ("; even so it may run out of memory: lower train.batch_size or data.max_length, or set "
                "model.quantization=4bit" if tight else "")
        return (f"gradient checkpointing: {self.layers} of {self.total_layers} layers (estimated peak "
                f"{gib(self.estimate.peak)} {versus} {gib(self.usable)} usable; {gib(self.without.peak)} with none"
                f"{hint}{order})")

    def _of_usable(self) -> str:
        return f" of {gib(self.usable)} usable" if self.usable is not None else ""


def decide(setting: bool | str, estimates: tuple[Estimate, ...], usable: int | None, on_gpu: bool,
           microbatch: MicroBatch) -> Decision:
    """auto: the fewest checkpointed layers whose estimated peak fits the usable memory (all of them
    when none does); true: all layers; false: none.

    Never on the CPU: there the activations live in host RAM, shared with the rest of the machine
    and stretched by swap, so there is no device total to hold the estimate against; CPU runs are
    the small ones (the demo, tests); and every rebuilt layer adds to the compute of the slowest device.
    """
    every = len(estimates) - 1
    if setting != "auto":
        layers = every if setting else 0
    elif not on_gpu or usable is None:
        layers = 0
    else:
        layers = next((k for k, e in enumerate(estimates) if e.peak <= usable), every)
    return Decision(layers, estimates, usable, setting, on_gpu, microbatch)


def planned_microbatch(cfg, examples, world_size: int) -> MicroBatch:
    """The largest micro-batch of the run `cfg` plans on `examples` in `world_size` processes. It depends
    on nothing a resume changes, so a resumed run sizes (and decides) alike."""
    from roletune.training.epoch_order import training_order

    t = cfg.train
    batches = training_order(len(examples), t.batch_size, world_size, t.seed, t.grad_accum, t.epochs, t.max_steps)
    if batches is None:
        return largest_possible_microbatch(examples, t.batch_size, t.packing, t.reply_logits_only)
    return worst_microbatch(examples, batches, t.packing, t.reply_logits_only)


def for_run(cfg, examples, device: torch.device, dtype: torch.dtype, model_config=None,
            on_gpu: bool | None = None, world_size: int | None = None) -> Decision:
    """The decision for `cfg` training on `examples`; `on_gpu` defaults to the device's kind and
    `world_size` to this launch's."""
    from roletune.model import load_model_config
    from roletune.training.batching import length_multiple, padded_length
    from roletune.training.distributed import current, sharded

    t = cfg.train
    model_config = model_config if model_config is not None else load_model_config(cfg.model)
    microbatch = planned_microbatch(cfg, examples, current().world_size if world_size is None else world_size)
    positions = microbatch.positions
    if t.reply_logits_only and t.lm_head_loss != "full" and not sharded(cfg):
        positions = min(positions, t.loss_chunk)  # the chunked (or fused) head holds one chunk's logits at a time
    quantization = None if cfg.model.quantization == "none" else cfg.model.quantization
    tokens = padded_length(microbatch.tokens, length_multiple(t))  # the padding under CUDA graphs, if any
    estimates = tuple(estimate(model_config, cfg.lora, dtype, tokens, positions, k, quantization,
                               lean=t.lean_activations, graphed=t.cuda_graphs)
                      for k in range(model_config.num_hidden_layers + 1))
    on_gpu = device.type == "cuda" if on_gpu is None else on_gpu
    return decide(t.gradient_checkpointing, estimates, usable_bytes(device, t.memory_budget_gib), on_gpu, microbatch)


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
    every = decision.total_layers
    lines = [f"memory (estimated, {name} on {where}): peak {gib(decision.without.peak)} with no layer checkpointed, "
             f"{gib(decision.with_all.peak)} with all {every}",
             f"  for {decision.microbatch.describe()}",
             f"  none:     {decision.without.parts()}",
             f"  all {every}:   {decision.with_all.parts()}"]
    if 0 < decision.layers < every:
        lines.append(f"  {decision.layers} of {every}: {decision.estimate.parts()}")
    lines.append(decision.line())
    if not for_gpu:
        lines.append("set train.memory_budget_gib=N to plan for a GPU with N GiB")
    return lines


def gib(count: int | None) -> str:
    return f"{count / GiB:.1f} GiB"
