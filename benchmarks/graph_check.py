"""Whether train.cuda_graphs trains what the eager layers train, on this GPU: real CUDA graphs, where the
test suite (tests/test_layer_graphs.py) has a CPU stand-in.

A Qwen2 of 4 layers, 256 wide, random weights, LoRA r=8 on the seed's seven projections with dropout 0 (a
recording keeps its dropout masks and eager layers redraw theirs, so only dropout 0 can agree), built by
roletune's own code (train.build_model) twice from the same seed: with its layers run one by one and
with them replayed from CUDA graphs. Both take the same steps under bf16 autocast: packed rows padded to
a multiple of 64 tokens as training pads them, lengths that recur (replays of a recording) and lengths
that do not, two micro-batches a step (gradients added across them), gradients set to None after each
update as Trainer does, and an SGD update large enough for a wrong gradient to show. Prints each side's
losses, how far the adapter's updates differ, the recordings made and the host's time per step (this
model is too small for its arithmetic to matter).

Then decoding (roletune.speed.decode_graphs): the graphed model, in eval mode, answers three left-padded prompts
greedily from a static KV cache twice, with its decoding steps replayed from CUDA graphs and with them run
one by one. The same kernels either way, so the same tokens and logits; prints both sides' time per token.

Then, with LoRA dropout on, one micro-batch replayed twice must give two losses: new masks each replay.
The training check and this one again with lora.grouped (q/k/v and gate/up sharing their LoRA work).

All the while another thread allocates pinned host memory, as a DataLoader's pinning thread does: the
recordings must neither break on it nor break it. Last `graph_check=ok` or `graph_check=FAILED`.

usage: python benchmarks/graph_check.py        (a GPU machine; the CPU has no CUDA graphs to check)
"""
from __future__ import annotations

import sys
import threading
import time

import torch

from roletune import train
from roletune.config import config_from_dict
from roletune.speed import attention, layer_graphs
from roletune.training.batching import GRAPHED_LENGTH_MULTIPLE, pad_packed

VOCAB = 1024
# Micro-batches of each step, as example lengths: the first step's come back in the fourth.
STEPS = [[[30, 50, 20], [40, 40]], [[25, 60], [100, 7, 9, 30]], [[70], [30, 50, 20]], [[30, 50, 20], [40, 40]],
         [[12, 12, 12], [64, 64]]]
TOLERANCE = 0.05  # bf16, and flash attention's backward adds with atomics: not bit for bit


def build(graphs: bool, device: torch.device, dropout: float = 0.0, grouped: bool = False):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    cfg = config_from_dict({"model": {"path": "narrow-qwen2", "dtype": "bf16", "device": str(device)},
                            "data": {"path": "unused.json"}, "lora": {"r": 8, "alpha": 32, "dropout": dropout},
                            "output_dir": "unused"},
                           [f"train.cuda_graphs={str(graphs).lower()}", f"lora.grouped={str(grouped).lower()}"])
    train.load_base_model = lambda model_cfg, where, dtype: AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation="sdpa").to(where)
    return train.build_model(cfg, device, echo=print).train()


def microbatch(lengths: list[int], seed: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=generator)
    ends = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions, "cu_seq_lens_q": ends,
              "cu_seq_lens_k": ends, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    padded = pad_packed(inputs, GRAPHED_LENGTH_MULTIPLE, 0)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in padded.items()}


def run(model, device: torch.device) -> tuple[list[float], list[torch.Tensor], list[float]]:
    weights = [p for p in model.parameters() if p.requires_grad]
    before = [w.detach().clone() for w in weights]
    optimizer = torch.optim.SGD(weights, lr=0.5)
    losses, seconds = [], []
    for step, lengths in enumerate(STEPS):
        started = time.perf_counter()
        for i, one in enumerate(lengths):
            inputs = attention.without_mask_building(model, microbatch(one, 10 * step + i, device))
            labels = inputs.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**inputs, labels=labels, use_cache=False).loss / len(lengths)
            loss.backward()
            losses.append(loss.detach())
        optimizer.step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    updates = [w.detach() - b for w, b in zip(weights, before)]
    return [loss.item() for loss in losses], updates, seconds


class Pinning(threading.Thread):
    """Pinned host memory allocated again and again on a thread of its own, in varying sizes (a DataLoader
    pinning its next batches): CUDA calls from another thread while recordings are made."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.pins, self.error = threading.Event(), 0, None

    def run(self) -> None:
        kept = []
        try:
            while not self.stop.is_set():
                kept = [*kept[-8:], torch.empty(4096 * (1 + self.pins % 61), dtype=torch.uint8).pin_memory()]
                self.pins += 1
                time.sleep(0.001)
        except Exception as exc:  # noqa: BLE001 - reported by the check
            self.error = f"{type(exc).__name__}: {exc}"


def decode(model, device: torch.device, graphed: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tokens, logits, seconds per token) of three left-padded prompts, 48 greedy tokens each."""
    runner = layer_graphs.runner_of(model)
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randint(1, VOCAB, (3, 40), generator=generator)
    mask = torch.ones_like(prompts)
    mask[0, :12], mask[2, :25] = 0, 0  # shorter prompts, padded on the left
    accepts = runner.decoding.accepts
    if not graphed:
        runner.decoding.accepts = lambda *args: False
    try:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=prompts.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=48, min_new_tokens=48, pad_token_id=0, eos_token_id=None,
                                 cache_implementation="static", disable_compile=True, output_logits=True,
                                 return_dict_in_generate=True)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 48
    finally:
        runner.decoding.accepts = accepts
    return out.sequences, torch.stack(out.logits).float(), seconds


def check_decoding(model, device: torch.device) -> bool:
    model.eval()
    eager_tokens, eager_logits, _ = decode(model, device, graphed=False)  # the first call warms up
    eager_tokens, eager_logits, eager_s = decode(model, device, graphed=False)
    graph_tokens, graph_logits, graph_s = decode(model, device, graphed=True)
    decoding = layer_graphs.summary(model)["decoding"]
    error = ((graph_logits - eager_logits).abs().max() / eager_logits.abs().max()).item()
    same = torch.equal(graph_tokens, eager_tokens)
    print(f"decoding: same tokens {same}, logits differ by {error:.2e} of their largest; ms per token, eager "
          f"{1000 * eager_s:.2f}, graphs {1000 * graph_s:.2f} (recording included); graphs: {decoding}")
    # 48 tokens: the prefill's, the step that records, 46 replays.
    return same and error < 1e-3 and decoding["failed"] is None and decoding["recordings"] == 1 and \
        decoding["replays"] == 46


def check_fresh_masks(device: torch.device, grouped: bool = False) -> bool:
    """With LoRA dropout on, a replay must draw new masks (CUDA's generator moves on inside a graph, as it
    does eagerly): the same micro-batch, replayed twice with the adapter unchanged, gives two losses, where
    a graph that replayed its recording's masks would give the same one twice."""
    model = build(True, device, dropout=0.1, grouped=grouped)
    with torch.no_grad():  # lora_B starts at zero, where dropout changes nothing
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    inputs = attention.without_mask_building(model, microbatch([30, 50, 20], 0, device))
    labels = inputs.pop("labels")
    losses = []
    for _ in range(3):  # recorded (and replayed), then replayed twice
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    summary = layer_graphs.summary(model)
    fresh = summary["recordings"] == 1 and summary["failed"] is None and len(set(losses)) == 3
    print(f"dropout 0.1{', grouped' if grouped else ''}, one micro-batch three times: "
          f"losses {[round(x, 6) for x in losses]}, "
          f"{'new masks each replay' if fresh else 'NOT new masks each replay'}; graphs: {summary}")
    return fresh


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("graph_check: needs a CUDA GPU (the CPU's check is tests/test_layer_graphs.py)")
    device = torch.device("cuda", 0)
    pinning = Pinning()
    pinning.start()
    good, model = check_training(device)
    good = check_decoding(model, device) and good
    good = check_fresh_masks(device) and good
    # The same with the LoRA branches that read one input grouped (lora.grouped): the kept masks are theirs.
    good = check_training(device, grouped=True)[0] and good
    good = check_fresh_masks(device, grouped=True) and good
    pinning.stop.set()
    pinning.join()
    print(f"another thread pinned host memory {pinning.pins} times meanwhile: {pinning.error or 'no error'}")
    good = good and pinning.error is None and pinning.pins > 0
    print(f"graph_check={'ok' if good else 'FAILED'}")
    if not good:
        sys.exit(1)


def check_training(device: torch.device, grouped: bool = False):
    """(whether the graphed layers train the eager layers' adapter, the graphed model)."""
    eager_losses, eager_updates, eager_s = run(build(False, device, grouped=grouped), device)
    model = build(True, device, grouped=grouped)
    graph_losses, graph_updates, graph_s = run(model, device)
    summary = layer_graphs.summary(model)
    if grouped:
        print("lora.grouped:")
    print(f"losses, eager:  {[round(x, 5) for x in eager_losses]}")
    print(f"losses, graphs: {[round(x, 5) for x in graph_losses]}")
    loss_error = max(abs(g - e) / max(abs(e), 1e-6) for g, e in zip(graph_losses, eager_losses))
    eager_norm = torch.cat([e.flatten().float() for e in eager_updates]).norm().item()
    update_error = (torch.cat([(g - e).flatten().float() for g, e in zip(graph_updates, eager_updates)]).norm().item()
                    / max(eager_norm, 1e-12))
    print(f"largest relative loss difference {loss_error:.2e}; adapter updates differ by {update_error:.2e} "
          f"of their norm; graphs: {summary}")
    # Steps after the first that replay only (the fourth repeats the first's lengths): host time per step.
    print(f"host time per step, eager {[round(s * 1000, 1) for s in eager_s]} ms, "
          f"graphs {[round(s * 1000, 1) for s in graph_s]} ms")
    good = (summary is not None and summary["failed"] is None and summary["recordings"] > 0 and eager_norm > 0
            and loss_error < TOLERANCE and update_error < TOLERANCE)
    return good, model


if __name__ == "__main__":
    main()
