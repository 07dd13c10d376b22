"""How examples become micro-batches, and the loss on them.

Padding-free batches: the examples of a micro-batch are concatenated into one row with
`position_ids` restarting at 0 for each example. transformers recognises packed sequences from those
position ids and keeps the examples apart in attention (a block-diagonal mask for sdpa/eager, which
reply_token_loss hands sdpa ready-made: see attention.without_mask_building); for the varlen kernels
(roletune.speed.attention, flash-attention) the collator adds the examples' boundaries. Role-play lines
are short and uneven (the huanhuan data: mean 67 tokens, longest 250), so a padded batch is about
half padding.

Reply-only logits: the 152k-column LM head runs only at positions whose next token carries a
label (a third of the positions here), through the model's own `logits_to_keep`; or, with a
head loss from roletune.training.loss, on their final hidden states without all their logits at once.
"""
from __future__ import annotations

import weakref

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
from transformers.trainer_utils import EvalLoopOutput

from roletune.data.tokenize import IGNORE_INDEX
from roletune.speed import attention


def make_collator(tokenizer, packing: bool, flash_attention: bool = False):
    if packing:
        # The first label of every example becomes -100: it would be predicted from the previous example.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=flash_attention)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


# The batch key under which with_reply_index hands the loss its trained positions.
REPLY_INDEX = "reply_index"


def with_reply_index(collate):
    """`collate`, adding to each batch the (row, column) indices of its trained tokens in labels[:, 1:]
    (under REPLY_INDEX), found on the host while the batch is built.

    Selecting the trained positions with a boolean mask on a GPU makes the host wait, in the middle of
    every step, for the GPU to say how many there are (the output's size depends on the mask's values);
    with indices the host already holds, it queues the loss and the backward without that pause.
    """
    def collate_with_index(features):
        batch = collate(features)
        batch[REPLY_INDEX] = reply_index(batch["labels"])
        return batch
    return collate_with_index


def reply_index(labels: torch.Tensor) -> torch.Tensor:
    """The (row, column) indices of the trained tokens in labels[:, 1:], as a 2 x N tensor."""
    return torch.stack(torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True))


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict a trained token (in any row of the batch)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def reply_token_loss(model, inputs: dict, labels: torch.Tensor, num_items: int | torch.Tensor | None = None,
                     head_loss=None):
    """Summed cross-entropy over the trained tokens divided by `num_items` (default: their count).

    With `num_items` = the trained tokens of the whole optimizer step (Trainer's num_items_in_batch),
    every trained token weighs the same however the step is split into micro-batches or packed:
    the seed's per-step token average, not a mean of micro-batch means. `head_loss` (from
    roletune.training.loss) computes the LM head and the summed loss from the final hidden states, at the
    positions `inputs[REPLY_INDEX]` names when the collator added it (see with_reply_index);
    None computes the logits of every trained position at once.
    """
    inputs = dict(attention.without_mask_building(model, inputs))
    trained = inputs.pop(REPLY_INDEX, None)
    if head_loss is None:
        positions = labelled_positions(labels)
        # No KV cache: with one, transformers stops reading packed sequences from the position ids.
        outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
        targets = labels[:, 1:][:, positions]
        loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        outputs, hidden = final_hidden_states(model, inputs)
        if trained is None:  # found here, the host waits for the device to count them
            trained = reply_index(labels)
        rows, columns = trained
        targets = labels[:, 1:][rows, columns]
        loss = head_loss(hidden[rows, columns], output_embeddings(model), targets)
    divisor = num_items if num_items is not None else (targets != IGNORE_INDEX).sum().clamp(min=1)
    return loss / divisor, outputs


# torch.compile's modes that replay CUDA graphs, recorded once per input shape.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Under them, packed rows are padded to a multiple of this: ~1,000-token micro-batches of short lines then
# fall into a dozen lengths (each recorded once), for at most 64 padded tokens a row.
GRAPHED_LENGTH_MULTIPLE = 64


def length_multiple(train_cfg) -> int:
    """What the length of a packed micro-batch is padded to a multiple of: 1 (no padding) unless CUDA graphs
    are replayed (compiled code's, or train.cuda_graphs)."""
    graphs = (train_cfg.compile and train_cfg.compile_mode in CUDA_GRAPH_MODES) or train_cfg.cuda_graphs
    return GRAPHED_LENGTH_MULTIPLE if graphs and train_cfg.packing else 1


def padded_length(length: int, multiple: int) -> int:
    """The length of a packed row of `length` tokens after pad_packed: at least one pad token."""
    return length if multiple == 1 else (length // multiple + 1) * multiple


def pad_packed(inputs: dict, multiple: int, pad_id: int) -> dict:
    """`inputs`, a packed micro-batch (one row), with one more example at its end: pad tokens with no label,
    positions of their own and, for varlen attention, boundaries of their own, so no other example attends
    to them and the loss does not see them. The row becomes padded_length() long; with varlen attention the
    longest example is declared as long as the row (an upper bound the kernel accepts), so the only
    numbers that vary from one micro-batch of n examples to the next are those a CUDA graph reads from
    its input tensors. A pad token is always added: n examples always have n + 2 boundaries."""
    ids = inputs["input_ids"]
    length = ids.shape[1]
    extra = padded_length(length, multiple) - length
    if ids.shape[0] != 1 or extra == 0:
        return inputs
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([ids, ids.new_full((1, extra), pad_id)], dim=1)
    padded["labels"] = torch.cat([inputs["labels"], ids.new_full((1, extra), IGNORE_INDEX)], dim=1)
    positions = inputs["position_ids"]
    padded["position_ids"] = torch.cat([positions, torch.arange(extra, device=positions.device,
                                                                dtype=positions.dtype)[None]], dim=1)
    for side in ("q", "k"):
        if f"cu_seq_lens_{side}" in inputs:
            ends = inputs[f"cu_seq_lens_{side}"]
            padded[f"cu_seq_lens_{side}"] = torch.cat([ends, ends.new_full((1,), length + extra)])
            padded[f"max_length_{side}"] = length + extra
    return padded


_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_embeddings(model):
    """The LM head of `model` (under any DDP/FSDP/peft wrapper), looked up once per model: unwrapping walks
    every module (accelerate looks for compiled regions), which would cost host time every micro-batch."""
    head = _heads.get(model)
    if head is None:
        head = _heads[model] = extract_model_from_parallel(model).get_output_embeddings()
    return head


def final_hidden_states(model, inputs: dict):
    """The model's outputs and its final (post-norm) hidden states, with no logits computed.

    The forward goes through `model` itself, wrapper and all: DDP syncs gradients only for
    forwards through its wrapper, so no inner module is called directly. The hidden states are
    the output of the decoder's final norm (the LM head's input), kept by a hook on it. An empty
    `logits_to_keep` leaves the head nothing to compute. Where the decoder has no `norm`, they
    come from transformers' output capture instead (`hidden_states[-1]`, tied to the decoder's
    output), whose hooks on every layer and attention module read a ContextVar: torch.compile
    cannot trace that, so compiled layers would break into pieces around each hook.
    """
    no_positions = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    keeper = _norm_output_keeper(model)
    if keeper is None:
        outputs = model(**inputs, logits_to_keep=no_positions, output_hidden_states=True, use_cache=False)
        return outputs, outputs.hidden_states[-1]
    outputs = model(**inputs, logits_to_keep=no_positions, use_cache=False)
    return outputs, keeper.take()


class NormOutputKeeper:
    """A forward hook that keeps its module's last output until taken."""

    def __init__(self):
        self.output = None

    def __call__(self, module, args, output) -> None:
        self.output = output

    def take(self) -> torch.Tensor:
        output, self.output = self.output, None
        return output


_keepers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_output_keeper(model) -> NormOutputKeeper | None:
    """The hook on `model`'s final norm (installed once), or None where its decoder has no `norm`."""
    if model not in _keepers:
        inner = extract_model_from_parallel(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        keeper = None
        if isinstance(norm, torch.nn.Module):
            keeper = NormOutputKeeper()
            norm.register_forward_hook(keeper)
        _keepers[model] = keeper
    return _keepers[model]


class ReplyLoss:
    """Trainer mixin: with `reply_logits_only`, the loss computes logits only where a label is (see the module
    docstring), through `head_loss` (roletune.training.loss; None: all the trained positions' logits at once)."""

    reply_logits_only = False
    head_loss = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.reply_logits_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss, outputs = reply_token_loss(model, inputs, labels, num_items_in_batch, self.head_loss)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


class HeldOutLoss:
    """Trainer mixin: the eval loss is the mean cross-entropy over every trained token of the held-out
    rows, summed on each rank and then over ranks.

    Trainer's own eval loss is a mean of micro-batch means, so it moves with the batch size, the
    packing and the number of processes; this one is the same number however the rows are split.
    """

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        model, device = self.model, self.args.device
        was_training = model.training
        model.eval()
        summed = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.int64, device=device)
        try:
            # Eagerly, as sample answers: compiled layers (train.compile) would compile and record anew for
            # no-grad forwards of the eval batches' lengths.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for batch in dataloader:
                    inputs = self._prepare_inputs(batch)
                    labels = inputs.pop("labels")
                    loss, _ = reply_token_loss(model, inputs, labels, 1, self.head_loss)  # a sum
                    summed += loss.double()
                    tokens += (labels[:, 1:] != IGNORE_INDEX).sum()
        finally:
            model.train(was_training)
        summed, tokens = self.accelerator.reduce(summed, "sum"), self.accelerator.reduce(tokens, "sum")
        metrics = {f"{metric_key_prefix}_loss": (summed / tokens.clamp(min=1)).item()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                              num_samples=len(self.eval_dataset) if self.eval_dataset is not None else 0)
