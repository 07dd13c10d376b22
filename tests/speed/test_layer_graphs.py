"""train.cuda_graphs (roletune.speed.layer_graphs) on the CPU, through a stand-in with a CUDA graph's semantics
(tests/emulated_graph.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from roletune.config import load_config
from roletune.speed import attention, graphs, layer_graphs, lora_fused

from emulated_graph import EmulatedGraph, graphs_on_the_cpu


def test_the_emulated_graph_replays_the_memory_it_captured():
    """The stand-in's own check: a replay reads tensors changed in place, not a tensor put in their place."""
    weight, total = torch.ones(3), torch.zeros(3)
    graph = EmulatedGraph()
    with graph.capture():
        out = weight * 2
        total.add_(out)
    assert total.tolist() == [0, 0, 0]  # capturing ran nothing on what existed before
    graph.replay()
    assert out.tolist() == [2, 2, 2] and total.tolist() == [2, 2, 2]
    weight.fill_(3)
    graph.replay()
    assert out.tolist() == [6, 6, 6] and total.tolist() == [8, 8, 8]
    weight = torch.full((3,), 5.0)  # a new tensor: the graph never sees it
    graph.replay()
    assert out.tolist() == [6, 6, 6]
    with pytest.raises(RuntimeError, match="read back to the host"), graph.capture():
        (weight * 2).sum().item()
    slots, late = torch.zeros(3), EmulatedGraph()
    with late.capture():  # an index only the running kernel checks: a capture does not fail on it
        slots.index_copy_(0, torch.tensor([3]), torch.ones(1))
    with pytest.raises(IndexError):
        late.replay()


def masked_attention(query, key, value, cu_seq_lens, scale):
    """attention.per_example's result with the boundaries read on the device (the CPU reference reads them on
    the host, which a graph would fix at the captured micro-batch's; the GPU's flash kernel reads the tensor)."""
    tokens = query.shape[0]
    example = torch.searchsorted(cu_seq_lens[1:].contiguous(), torch.arange(tokens), right=True)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = (example[:, None] == example[None, :]) & causal
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


@pytest.fixture
def emulated(monkeypatch):
    """train.cuda_graphs on the CPU: the layers graphed with EmulatedGraph; returns the runners installed."""
    runners = graphs_on_the_cpu(monkeypatch)
    monkeypatch.setattr(layer_graphs, "refusal", lambda *args: None)
    monkeypatch.setattr(attention, "per_example", masked_attention)
    return runners


VARLEN = {"attn_implementation": "varlen"}


@pytest.mark.slow
def test_graphed_layers_train_the_eager_adapter(short_run, tiny_model, emulated, tmp_path):
    """Four steps of two micro-batches each (gradients added across them by the backward graph), padded to a
    multiple of 64 tokens: the losses, gradient norms and adapter of the eager run. The held-out loss runs
    eagerly; the sample answers, before training and after each epoch, decode from graphs of their own
    (roletune.speed.decode_graphs), one recording per answering, and answer as the eager run does."""
    model = {"path": str(tiny_model), "device": "cpu", **VARLEN}
    sections = {"model": model, "data": {"eval_size": 2}, "eval": {"samples": 1, "max_new_tokens": 6, "steps": 2},
                "train": {"grad_accum": 2, "batch_size": 2}}
    want, want_log = short_run("eager", **sections)
    got, got_log = short_run("graphs", **{**sections, "train": {**sections["train"], "cuda_graphs": True}})
    (runner,) = emulated
    assert runner.recordings and len(runner.recordings) < 8  # recorded per length, replayed for the rest
    assert all(key[1][0][0][1] % 64 == 0 for key in runner.recordings)  # (1, T, hidden): T padded
    summary = json.loads((tmp_path / "graphs" / "train_summary.json").read_text())["cuda_graphs"]
    assert summary["recordings"] == len(runner.recordings) and summary["failed"] is None
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    samples = [[(row["epoch"], row["answer"]) for row in map(json.loads, open(tmp_path / name / "samples.jsonl"))]
               for name in ("eager", "graphs")]
    assert len(samples[1]) == 3 and samples[1] == samples[0]
    assert summary["decoding"] == {**summary["decoding"], "recordings": 3, "replays": 3 * 4, "failed": None}


@pytest.mark.slow
def test_graphed_layers_with_grouped_lora_train_the_eager_adapter(short_run, tiny_model, emulated):
    """lora.grouped through the graphs: q/k/v and gate/up's shared lora_A work is recorded and replayed like the
    rest, and trains what it trains eagerly."""
    sections = {"model": {"path": str(tiny_model), "device": "cpu", **VARLEN},
                "train": {"grad_accum": 2, "batch_size": 2}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "grouped": True}}
    want, want_log = short_run("eager", **sections)
    got, got_log = short_run("graphs", **{**sections, "train": {**sections["train"], "cuda_graphs": True}})
    assert emulated[0].recordings
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_graphed_layers_with_dropout_train(short_run, tiny_model, emulated):
    """With LoRA dropout the recorded masks are new draws each replay (kept for backward, not redrawn): the
    run trains, its losses close to eager's, not equal."""
    model = {"path": str(tiny_model), "device": "cpu", **VARLEN}
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}
    _, want_log = short_run("eager", model=model, lora=lora)
    _, got_log = short_run("graphs", model=model, lora=lora, train={"cuda_graphs": True})
    assert got_log != want_log and got_log == pytest.approx(want_log, rel=0.2)


@pytest.mark.parametrize("kernel", [False, True])
def test_a_recording_keeps_the_dropout_mask_and_differentiates_through_it(monkeypatch, kernel):
    """While a graph is recorded the fused LoRA branch keeps its mask instead of the RNG state: the gradients
    are those of result + scaling * B A dropout(x) with that same mask. kernel: the fused dropout kernel's
    bool mask (a GPU's; run here on the CPU), kept 8 elements a byte; else the CPU's float noise."""
    if kernel:
        monkeypatch.setattr(lora_fused, "FUSED_DROPOUT_DEVICES", {"cpu"})
    torch.manual_seed(0)
    x = torch.randn(5, 16, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    result, grad = torch.randn(5, 8), torch.randn(5, 8)
    monkeypatch.setattr(graphs, "_capturing", True)
    state = torch.get_rng_state()
    out = lora_fused._LoraBranch.apply(result, x, a, b, 2.0, 0.25, torch.float32, None)
    out.backward(grad)
    torch.set_rng_state(state)
    if kernel:
        noise = torch.native_dropout(torch.ones(5, 16), 0.25, True)[0]
    else:
        noise = torch.empty(5, 16).bernoulli_(0.75).div_(0.75)  # the mask _dropout drew on the CPU
    x2, a2, b2 = (t.detach().requires_grad_() for t in (x, a, b))
    want = result + 2.0 * (x2 * noise) @ a2.t() @ b2.t()
    want.backward(grad)
    torch.testing.assert_close(out, want)
    for got, expected in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, expected)


def test_off_the_gpu_the_layers_run_one_by_one_and_nothing_is_padded(config_file, short_run, tiny_model, monkeypatch):
    from roletune import train
    from roletune.training import trainer

    model = {"path": str(tiny_model), "device": "cpu", **VARLEN}
    lines = []
    built = train.build_model(load_config(config_file(model=model, train={"cuda_graphs": True})), torch.device("cpu"),
                              echo=lines.append)
    assert "CUDA graphs: off, the layers run one by one (they need a GPU)" in lines
    assert not layer_graphs.installed(built)

    def no_padding(*args):
        raise AssertionError("padded for graphs that were refused")
    monkeypatch.setattr(trainer, "pad_packed", no_padding)
    _, log = short_run("refused", model=model, train={"cuda_graphs": True})
    assert len(log) == 8


@pytest.mark.slow
def test_a_recording_that_fails_leaves_the_layers_to_run_one_by_one(short_run, tiny_model, emulated, caplog):
    """An optimisation never ends a run: a recording that raises (here: a value read back to the host while
    capturing, which the CPU's per-example attention does) is reported once, and training goes on eagerly."""
    model = {"path": str(tiny_model), "device": "cpu", **VARLEN}
    _, want_log = short_run("eager", model=model)
    attention_on_device = attention.per_example

    def host_read(*args):
        args[3].sum().item()
        return attention_on_device(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "per_example", host_read)
        _, got_log = short_run("graphs", model=model, train={"cuda_graphs": True})
    (runner,) = emulated
    assert not runner.recordings and "read back to the host" in runner.failed
    assert [r.message for r in caplog.records if "CUDA graphs" in r.message] == [
        f"CUDA graphs: recording the layers failed ({runner.failed}); they run one by one from now on"]
    assert got_log == pytest.approx(want_log, rel=1e-5)


@pytest.mark.slow
def test_where_training_steps_cannot_be_graphed_sample_answers_still_are(config_file, short_run, tiny_model,
                                                                        emulated, monkeypatch):
    """A run whose training steps cannot be graphed (here: told so) still graphs its sample answers' decoding:
    its micro-batches are not padded, and its steps and answers are the eager run's."""
    from roletune import train
    from roletune.training import trainer

    model = {"path": str(tiny_model), "device": "cpu", **VARLEN}
    sections = {"model": model, "data": {"eval_size": 2}, "eval": {"samples": 1, "max_new_tokens": 4}}
    _, want_log = short_run("eager", **sections)
    monkeypatch.setattr(layer_graphs, "refusal", lambda *args: "checkpointed layers rebuild their activations")
    lines = []
    train.build_model(load_config(config_file(model=model, train={"cuda_graphs": True})), torch.device("cpu"),
                      echo=lines.append)
    assert ("CUDA graphs: for the sample answers' decoding only; training steps run the layers one by one "
            "(checkpointed layers rebuild their activations)") in lines

    def no_padding(*args):
        raise AssertionError("padded for training graphs that were refused")
    monkeypatch.setattr(trainer, "pad_packed", no_padding)
    _, got_log = short_run("graphs", **sections, train={"cuda_graphs": True})
    runner = emulated[-1]
    assert not runner.training and not runner.recordings and runner.decoding.made == 3
    assert got_log == pytest.approx(want_log, rel=1e-5)


def test_a_recording_holds_only_its_own_thread_to_what_a_capture_allows(monkeypatch):
    """Captures are thread-local, as torch.compile's are: in the default (global) mode another thread's CUDA
    call during a recording (pinned memory for the next batch, say) breaks it and fails in that thread."""
    import contextlib

    seen = {}
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **options: seen.update(options) or contextlib.nullcontext())
    with layer_graphs.CudaGraph(pool="pool").capture():
        pass
    assert seen == {"pool": "pool", "capture_error_mode": "thread_local"}
