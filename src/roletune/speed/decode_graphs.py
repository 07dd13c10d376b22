"""Decoding steps replayed from a CUDA graph: sample answers under train.cuda_graphs, and `generate`,
`chat`, `compare` and `eval` with --cuda-graphs.

A decoding step takes one token a row through every layer. On a GPU its host time, launching some 1,700
kernels a token for a 7B model with its adapter (benchmarks/decode_time.py counts them), is far above the
GPU's own work, which is reading the 15 GB of weights once (about 3 ms at the H200's 4.8 TB/s). The H200 run
in benchmarks/results spent 28 s of a 196 s training run on 512 such steps of sample answers.

With a static KV cache (transformers' StaticCache: fixed-size tensors, its length kept in a device tensor),
every decoding step of a generate call gives the layers tensors of the same shapes at the same addresses
(the cache's), so the layers are recorded once per call, at its first decoding step, and replayed for the
rest. transformers' own way there is torch.compile's reduce-overhead mode over the whole forward, which
generate turns on by itself for a static cache on a GPU: it compiles the forward first, and again for new
batch shapes. Here the layers are recorded as they run eagerly (the fused LoRA branch, Liger's kernels,
sdpa), which costs one eager step.

A recording is made thus: the step runs eagerly (it writes its keys and values into the cache, advances
the cache's length and gives the step's output; on a GPU off the main stream, which also warms up what a
recording must not initialise), then the same step is captured, which runs nothing. Later steps copy their
inputs in and replay: the cache's length tensor says where each writes. A recording belongs to one cache
and holds it weakly: generate makes a new cache per call, so a call's first decoding step records anew, the
previous call's recording is dropped, and a cache that is gone is never written by a replay. A cache that
puts new tensors in place of its own (beam search reorders its rows so) is recorded again.
"""
from __future__ import annotations

import logging
import time
import weakref

import torch

from roletune.errors import brief
from roletune.speed.graphs import autocast_without_cache, kv_cache, side_stream, split

log = logging.getLogger(__name__)


class DecodingGraphs:
    """The decoding steps of LayerRunner's layers. `run_layers(names, tensors, kwargs)` runs them eagerly;
    `new_graph()` makes a graph (capture() as a context manager, replay())."""

    def __init__(self, run_layers, new_graph):
        self.run_layers, self.new_graph = run_layers, new_graph
        self.recordings: dict = {}  # key (argument shapes and values, see graphs.split) -> _Recording
        self.made = 0  # recordings made so far, one per generate call and batch shape
        self.replays = 0
        self.recording_s = 0.0
        self.failed: str | None = None  # why a recording failed, after which decoding runs the layers one by one

    def accepts(self, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        """A decoding step from a static cache, without gradients."""
        cache = kv_cache(kwargs)
        return (self.failed is None and not torch.is_grad_enabled() and hidden_states.shape[1] == 1
                and bool(getattr(cache, "is_compileable", False)) and not torch.compiler.is_compiling())

    def step(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """The layers' output for this step, replayed or recorded; None where it cannot be (an argument that
        cannot be part of a key), for the caller to run the layers one by one."""
        cache = kv_cache(kwargs)
        # The cache is no part of the key: a recording holds it itself, and says whether it is the same.
        names, tensors, key = split(hidden_states, {k: v for k, v in kwargs.items() if v is not cache})
        try:
            recording = self.recordings.get(key)
        except TypeError:
            return None
        held = _held(cache)
        if held is None:
            return None
        if recording is None or recording.cache() is not cache or recording.held != held:
            return self._record(key, names, tensors, kwargs, cache, held)
        for static, given in zip(recording.inputs, tensors):
            static.copy_(given)
        recording.graph.replay()
        self.replays += 1
        return recording.output.clone()  # the next replay writes over the recording's own

    def _record(self, key, names: list, tensors: list, kwargs: dict, cache, held: tuple) -> torch.Tensor:
        # The recordings of earlier calls (their caches) are done with: dropped first, their memory reused.
        self.recordings = {k: r for k, r in self.recordings.items() if r.cache() is cache}
        started = time.perf_counter()
        static = [t.clone() for t in tensors]
        device = static[0].device.type
        with side_stream(device), autocast_without_cache(device):
            output = self.run_layers(names, static, kwargs)  # the step itself, and the warm-up of its recording
        graph = self.new_graph()
        try:
            with autocast_without_cache(device), graph.capture():
                captured = self.run_layers(names, static, kwargs)
        except Exception as exc:  # noqa: BLE001 - answers must not end on an optimisation: they go on without
            self.failed = brief(exc)
            log.warning("CUDA graphs: recording a decoding step failed (%s); decoding runs the layers one by one "
                        "from now on", self.failed)
            return output
        self.recordings[key] = _Recording(graph, static, captured, weakref.ref(cache), held)
        self.made += 1
        self.recording_s += time.perf_counter() - started
        return output

    def summary(self) -> dict:
        return {"recordings": self.made, "replays": self.replays, "recording_s": round(self.recording_s, 2),
                "failed": self.failed}


def _held(cache) -> tuple | None:
    """Where the cache's keys and values are: a replay writes where the recording did, so a cache that put
    new tensors in place of its own (beam search reorders its rows so) needs a new recording. None for a
    cache whose tensors cannot be told."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    try:
        return tuple(t.data_ptr() for layer in layers for t in (layer.keys, layer.values))
    except AttributeError:
        return None


class _Recording:
    def __init__(self, graph, inputs: list, output: torch.Tensor, cache, held: tuple):
        self.graph, self.inputs, self.output, self.cache, self.held = graph, inputs, output, cache, held
