"""The decoder layers' forward and backward replayed as two CUDA graphs (train.cuda_graphs).

On short role-play lines a 7B training step is host-bound: the H200 run (benchmarks/results) had the GPU
busy 87 ms of a 217 ms step, the rest spent by Python launching some 6,300 kernels one by one. A CUDA
graph records a stretch of kernels once and replays it with one launch. torch.compile's reduce-overhead
mode does that too, but compiling first; here the layers run as they do eagerly (Liger's kernels, the
fused LoRA branch, varlen attention) and are recorded as they are, which costs one eager forward and
backward per recording instead of a compile.

A graph replays fixed shapes on fixed memory, so:
- packed micro-batches are padded to a multiple of 64 tokens (batching.pad_packed) and one pair of graphs
  (forward, backward) is recorded per shape, the first time it comes (a dozen for huanhuan's 702 steps);
- the inputs are copied into the recording's own tensors before each replay, and its output is returned;
- the backward graph adds the gradients into the adapter weights' .grad tensors, as autograd would: those
  tensors must stay the same, so any that were cleared (Trainer sets them to None every step) are put back,
  zeroed, before a replay;
- LoRA dropout keeps its mask for backward, 8 elements a byte, instead of redrawing it from the saved RNG state,
  which cannot be set during a recording (so the masks differ from eager's, not their distribution).
The graphs of all shapes share one memory pool: a forward is always followed by its own backward before
another shape replays (one micro-batch at a time), so what one recording frees the next may reuse.

The graphed path runs only for what it was recorded for: a training forward with gradients of a packed
row with its example boundaries, on CUDA, no KV cache. Decoding steps from a static KV cache (sample
answers, generation) are graphed by roletune.speed.decode_graphs; anything else (eval, prefill) runs the layers
one by one as transformers does. It is installed by replacing the decoder's layer list
with one that yields a single runner for the whole stack when the decoder's forward iterates it; the
layers, their names and the state dict are untouched. PyTorch's make_graphed_callables does the recording
too, but returns the gradients as new tensors on every replay, for autograd to add into .grad: with
gradient accumulation it then adds a replay's output to itself, since AccumulateGrad keeps the tensor it
is given, and that tensor is overwritten by the next replay.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
from torch import nn

from roletune.errors import brief
from roletune.model import decoder_layers
from roletune.speed import attention, graphs
from roletune.speed.decode_graphs import DecodingGraphs
from roletune.speed.graphs import autocast_without_cache, kv_cache, side_stream, split, unflatten

log = logging.getLogger(__name__)


class CudaGraph:
    """One recorded stretch of kernels (torch.cuda.CUDAGraph), in a memory pool shared with others."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self):
        # Thread-local, as torch.compile's CUDA graphs capture: only this thread is held to what a capture
        # allows. In the default (global) mode any other thread's CUDA call while a recording is made (a
        # DataLoader's pinning thread allocating pinned memory, a server's request thread) breaks the
        # recording and fails in that thread, where nothing catches it. The backward's kernels, launched from
        # autograd's device thread onto the capturing stream, are recorded in either mode.
        return torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local")

    def replay(self) -> None:
        self.graph.replay()


def graph_layers(model, cfg, world_size: int = 1) -> str:
    """Graph the decoder layers of `model` (a peft model) where this run allows it: training steps, and the
    decoding steps of its sample answers (roletune.speed.decode_graphs). Returns the line to show."""
    problem = decoding_refusal(model, world_size)
    if problem:
        return f"CUDA graphs: off, the layers run one by one ({problem})"
    problem = refusal(model, cfg, world_size)
    install(model, training=problem is None)
    if problem:
        return (f"CUDA graphs: for the sample answers' decoding only; training steps run the layers one by one "
                f"({problem})")
    return ("CUDA graphs: the decoder layers' forward and backward, recorded once per micro-batch length, and the "
            "sample answers' decoding steps")


def graph_decoding(model) -> str:
    """Graph the decoding steps of `model` (generate, chat, compare, eval); returns the line to show."""
    problem = decoding_refusal(model)
    if problem:
        return f"CUDA graphs: off, decoding runs the layers one by one ({problem})"
    install(model, training=False)
    return "CUDA graphs: decoding steps replayed, recorded once a generate call"


def decoding_refusal(model, world_size: int = 1) -> str | None:
    """Why the layers of `model` cannot be graphed at all here, or None."""
    if next(model.parameters()).device.type != "cuda":
        return "they need a GPU"
    if world_size > 1:  # DDP averages gradients in hooks that autograd runs, and the graphs bypass
        return "one process only"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "the model is spread over several devices"
    if any(kind != "full_attention" for kind in (getattr(model.config, "layer_types", None) or ())):
        # The runner is called once for all layers, with the first layer's mask.
        return "the layers attend differently (sliding windows), with masks of their own"
    return None


def refusal(model, cfg, world_size: int = 1) -> str | None:
    """Why the training steps of `model` cannot be graphed for this run, or None."""
    problem = decoding_refusal(model, world_size)
    if problem:
        return problem
    if cfg.train.compile:
        return "train.compile records its own (compile_mode=reduce-overhead)"
    if not cfg.train.packing or attention.active(model) != attention.VARLEN:
        return "they need packed micro-batches and varlen attention"
    if any(layer.gradient_checkpointing for layer in decoder_layers(model)):
        return "checkpointed layers rebuild their activations from the saved RNG state"
    return None


def install(model, new_graph=None, training: bool = True) -> "LayerRunner":
    """Make the decoder of `model` run its layers through a LayerRunner; returns it. `new_graph`: see
    LayerRunner. training: graph training steps too, not only decoding steps."""
    layers = decoder_layers(model)
    # The decoder's own list (model.model.layers for a Qwen2), which its forward iterates.
    holder = next(module for module in model.modules() if isinstance(module, nn.ModuleList)
                  and len(module) == len(layers) and all(a is b for a, b in zip(module, layers)))
    runner = LayerRunner(layers, new_graph, training)
    holder.__class__ = _graphed_list(type(holder))
    holder.__dict__["runner"] = runner
    return runner


def runner_of(model) -> "LayerRunner | None":
    return next((module.__dict__["runner"] for module in model.modules()
                 if isinstance(module, nn.ModuleList) and "runner" in module.__dict__), None)


def installed(model) -> bool:
    return runner_of(model) is not None


def graphs_training(model) -> bool:
    """Whether the training steps of `model` run from graphs (and its micro-batches are to be padded)."""
    runner = runner_of(model)
    return runner is not None and runner.training


def summary(model) -> dict | None:
    """What the graphs of `model` did so far (for benchmarks), or None where it has none."""
    runner = runner_of(model)
    if runner is None:
        return None
    return {"recordings": len(runner.recordings), "recording_s": round(runner.recording_s, 2), "failed": runner.failed,
            "training": runner.training, "decoding": runner.decoding.summary()}


@functools.cache
def _graphed_list(cls: type) -> type:
    return type("Graphed" + cls.__name__, (cls,), {"__getitem__": _getitem, "__module__": __name__})


def _getitem(layers, index):
    # transformers' decoders (Qwen2, Qwen3, Llama, Mistral; 5.17 to 5.24) run `for layer in self.layers[:n]`
    # with n the layer count: that slice yields the runner, which runs all of them. Anything else is the list's.
    if isinstance(index, slice) and index.indices(len(layers)) == (0, len(layers), 1):
        return [layers.__dict__["runner"]]
    return nn.ModuleList.__getitem__(layers, index)


class LayerRunner:
    """Runs the decoder's layers, from graphs where it can. Called as one layer is, with the whole stack's
    arguments; returns the last layer's hidden states."""

    def __init__(self, layers: list, new_graph=None, training: bool = True):
        """`new_graph`: makes a graph object (capture() as a context manager, replay()); None: a CudaGraph.
        training: graph training steps (else only decoding steps, roletune.speed.decode_graphs)."""
        self.layers, self.training = layers, training
        self.weights = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        self.new_graph = new_graph
        self.recordings: dict = {}
        self.pool = None
        self.failed: str | None = None  # why a recording failed, after which the layers run one by one
        self.recording_s = 0.0  # the host's time spent recording (warm-ups included)
        self.grads: list = [None] * len(self.weights)  # the .grad tensors the backward graphs add into
        # Decoding steps get graphs of their own, each in a memory pool of its own (pool None).
        self.decoding = DecodingGraphs(self._run, new_graph or (lambda: CudaGraph(None)))

    def __call__(self, hidden_states, *args, **kwargs):
        if args:
            return self._one_by_one(hidden_states, *args, **kwargs)
        if self._graphable(hidden_states, kwargs):
            return self._train(hidden_states, kwargs)
        decoding = not self.layers[0].training and self._on_device(hidden_states)
        if decoding and self.decoding.accepts(hidden_states, kwargs):
            output = self.decoding.step(hidden_states, kwargs)
            if output is not None:
                return output
        return self._one_by_one(hidden_states, **kwargs)

    def _train(self, hidden_states, kwargs):
        names, tensors, key = split(hidden_states, kwargs)
        try:
            recording = self.recordings.get(key)
        except TypeError:  # an argument that cannot be a key (a list, a dict): not what recordings are for
            return self._one_by_one(hidden_states, **kwargs)
        if recording is None:
            try:
                started = time.perf_counter()
                recording = self.recordings[key] = self._record(names, tensors, kwargs)
                self.recording_s += time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - a run must not end on an optimisation: it goes on without
                self.failed = brief(exc)
                log.warning("CUDA graphs: recording the layers failed (%s); they run one by one from now on",
                            self.failed)
                return self._one_by_one(hidden_states, **kwargs)
        return _Replay.apply(self, recording, self.weights[0], *tensors)

    def _one_by_one(self, hidden_states, *args, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, *args, **kwargs)
        return hidden_states

    def _on_device(self, hidden_states) -> bool:
        return hidden_states.is_cuda or self.new_graph is not None  # (a stand-in graph: tests on the CPU)

    def _graphable(self, hidden_states, kwargs) -> bool:
        """A training forward of a packed micro-batch, as training steps are recorded for."""
        return (self.training and self.failed is None and torch.is_grad_enabled() and self.layers[0].training
                and not hidden_states.requires_grad
                and hidden_states.shape[0] == 1 and "cu_seq_lens_q" in kwargs and not kwargs.get("use_cache")
                and kv_cache(kwargs) is None and bool(self.weights)
                and self._on_device(hidden_states) and not torch.compiler.is_compiling())

    def _run(self, names, tensors, kwargs):
        given = dict(kwargs)
        given.update(unflatten(names, tensors))
        return self._one_by_one(given.pop("hidden_states"), **given)

    def _record(self, names, tensors, kwargs) -> "_Recording":
        static = [t.clone() for t in tensors]
        device = static[0].device
        if device.type == "cuda":
            self._warm_up(names, static, kwargs)
        if self.new_graph is None and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        new_graph = self.new_graph or (lambda: CudaGraph(self.pool))
        forward, backward = new_graph(), new_graph()
        self.attach_grads()
        with graphs.recording():
            # Autocast's cache of cast weights would keep tensors made inside the recording for later eager calls.
            with autocast_without_cache(device.type), forward.capture():
                output = self._run(names, static, kwargs)
            grad = torch.empty_like(output)
            with backward.capture():
                torch.autograd.backward(output, grad, inputs=self.weights)  # adds into each weight's .grad
        return _Recording(forward, backward, static, output.detach(), grad)

    def _warm_up(self, names, static, kwargs) -> None:
        """One forward and backward off the main stream before recording (side_stream). The gradients are
        returned, not added into .grad."""
        with side_stream("cuda"), autocast_without_cache("cuda"):
            output = self._run(names, static, kwargs)
            torch.autograd.grad(output, self.weights, torch.zeros_like(output), allow_unused=True)
        del output
        torch.cuda.empty_cache()  # what the warm-up cached would otherwise sit beside the graphs' own pool

    def attach_grads(self) -> None:
        """Give every adapter weight the .grad tensor the backward graphs add into: the one it had when the
        first recording was made. Trainer and the optimizer clear gradients by setting them to None."""
        grads = self.grads
        cleared = []
        for i, weight in enumerate(self.weights):
            grad = weight.grad
            if grads[i] is None:
                grads[i] = weight.grad = torch.zeros_like(weight) if grad is None else grad
            elif grad is None:
                weight.grad = grads[i]
                cleared.append(grads[i])
            elif grad is not grads[i]:  # set by someone else: kept, in the tensor the graphs write
                grads[i].copy_(grad)
                weight.grad = grads[i]
        if cleared:
            torch._foreach_zero_(cleared)


class _Recording:
    def __init__(self, forward, backward, inputs: list, output: torch.Tensor, grad: torch.Tensor):
        self.forward, self.backward, self.inputs, self.output, self.grad = forward, backward, inputs, output, grad


class _Replay(torch.autograd.Function):
    """The recorded layers as one autograd node. `anchor` (an adapter weight) only makes the output need a
    gradient; the backward graph writes the weights' gradients itself, so none is returned for them."""

    @staticmethod
    def forward(ctx, runner, recording, anchor, *tensors):
        for static, given in zip(recording.inputs, tensors):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        recording.forward.replay()
        ctx.runner, ctx.recording, ctx.count = runner, recording, len(tensors)
        return recording.output.detach()  # a new tensor on the recording's memory, for autograd to mark

    @staticmethod
    def backward(ctx, grad):
        recording = ctx.recording
        recording.grad.copy_(grad)
        ctx.runner.attach_grads()
        recording.backward.replay()
        return (None, None, None, *([None] * ctx.count))
