"""Decoding steps from CUDA graphs (roletune.speed.decode_graphs) on the CPU, through the stand-in with a CUDA
graph's semantics (tests/emulated_graph.py)."""
from __future__ import annotations

import pytest
from test_quantization import qlora_run  # noqa: F401 - a fixture

from roletune import decoding, generate
from roletune.speed import layer_graphs

from emulated_graph import EmulatedGraph, graphs_on_the_cpu

CONVERSATIONS = [[{"role": "user", "content": f"第{i}个问题：今天海上风大吗？"}] for i in (3, 10, 7)]


@pytest.fixture
def graphed(trained_run, monkeypatch):
    """A session of the trained run whose decoding steps are graphed (stand-in graphs); returns (session,
    its runner)."""
    graphs_on_the_cpu(monkeypatch)
    lines = []
    session = decoding.load_session(str(trained_run), device="cpu", cuda_graphs=True, echo=lines.append)
    assert lines == ["CUDA graphs: decoding steps replayed, recorded once a generate call"]
    return session, layer_graphs.runner_of(session.model)


def answers(session, conversations, tokens=24):
    config = decoding.decoding_config(session, greedy=True, max_new_tokens=tokens)
    return [(r.text, r.stopped, r.tokens) for r in decoding.answer_all(session, conversations, config)]


@pytest.mark.slow
def test_graphed_decoding_answers_as_eager_decoding(trained_run, graphed):
    """Each generate call records its first decoding step (a static cache's) and replays the rest: the same
    greedy answers, stopped at end of turn, as the eager session with generate's default cache. A later
    call, of another batch, records anew and drops the earlier call's recording with its cache."""
    eager = decoding.load_session(str(trained_run), device="cpu")
    session, runner = graphed
    config = decoding.decoding_config(session, greedy=True)
    assert config.cache_implementation == "static" and config.disable_compile
    want = answers(eager, CONVERSATIONS)
    assert all(stopped for _, stopped, _ in want) and "灯塔照常亮着。" in want[0][0]
    assert answers(session, CONVERSATIONS) == want
    steps = runner.decoding
    assert steps.made == 1 and steps.replays == max(tokens for *_, tokens in want) - 1
    assert steps.failed is None and not runner.recordings  # no training step recorded
    assert answers(session, CONVERSATIONS[1:]) == answers(eager, CONVERSATIONS[1:])
    assert steps.made == 2 and len(steps.recordings) == 1


@pytest.mark.slow
def test_graphed_decoding_follows_the_adapter_switched_off_and_on(trained_run, graphed):
    """compare and eval answer with the adapter off, then on: each call records its own steps."""
    eager = decoding.load_session(str(trained_run), device="cpu")
    session, runner = graphed
    config = decoding.decoding_config(session, greedy=True, max_new_tokens=12)
    got = generate.compare(session, CONVERSATIONS, config)
    want = generate.compare(eager, CONVERSATIONS, decoding.decoding_config(eager, greedy=True, max_new_tokens=12))
    assert [(b.text, t.text) for b, t in got] == [(b.text, t.text) for b, t in want]
    assert got[0][0].text != got[0][1].text and runner.decoding.made == 2


@pytest.mark.slow
def test_a_decoding_recording_that_fails_leaves_decoding_eager(trained_run, graphed, monkeypatch, caplog):
    """A capture that raises is reported once; that step's answer is the eager step's, and later steps and
    calls run the layers one by one."""
    session, runner = graphed

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(EmulatedGraph, "capture", broken)
    want = answers(decoding.load_session(str(trained_run), device="cpu"), CONVERSATIONS)
    assert answers(session, CONVERSATIONS) == want
    assert answers(session, CONVERSATIONS) == want
    assert runner.decoding.made == 0 and "stream is capturing" in runner.decoding.failed
    assert [r.message for r in caplog.records if "CUDA graphs" in r.message] == [
        f"CUDA graphs: recording a decoding step failed ({runner.decoding.failed}); decoding runs the layers one "
        "by one from now on"]


def test_off_the_gpu_decoding_is_not_graphed(trained_run):
    lines = []
    session = decoding.load_session(str(trained_run), device="cpu", cuda_graphs=True, echo=lines.append)
    assert lines == ["CUDA graphs: off, decoding runs the layers one by one (they need a GPU)"]
    assert not layer_graphs.installed(session.model)
    assert decoding.decoding_config(session).cache_implementation is None


def test_chat_with_cuda_graphs_on_the_cpu_says_why_not_and_answers(trained_run, capsys):
    from roletune.cli import main

    assert main(["chat", str(trained_run), "--prompt", CONVERSATIONS[0][0]["content"], "--greedy", "--device", "cpu",
                 "--max-new-tokens", "24", "--cuda-graphs"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "CUDA graphs: off, decoding runs the layers one by one (they need a GPU)"
    assert out[-1].endswith("灯塔照常亮着。")


@pytest.mark.slow
def test_graphed_decoding_of_a_qlora_run_answers_as_eager_decoding(qlora_run, monkeypatch):
    """A 4-bit base (bitsandbytes' kernels, here its CPU ones) decodes through the graphs as it does eagerly."""
    cfg, _ = qlora_run
    want = answers(decoding.load_session(cfg.output_dir, device="cpu"), CONVERSATIONS, tokens=8)
    graphs_on_the_cpu(monkeypatch)
    session = decoding.load_session(cfg.output_dir, device="cpu", cuda_graphs=True, echo=lambda *_: None)
    assert answers(session, CONVERSATIONS, tokens=8) == want
    steps = layer_graphs.runner_of(session.model).decoding
    assert steps.made == 1 and steps.replays > 0 and steps.failed is None


@pytest.mark.slow
def test_graphed_beam_search_answers_as_eager_beam_search(trained_run, graphed):
    """Beam search puts the cache's reordered rows in new tensors at every step: a replay would write into the
    old ones, so each such step is recorded anew, and the answers are eager beam search's."""
    eager = decoding.load_session(str(trained_run), device="cpu")
    session, runner = graphed

    def beams(session):
        config = decoding.decoding_config(session, greedy=True, max_new_tokens=10, num_beams=2)
        return [reply.text for reply in decoding.answer_all(session, CONVERSATIONS[:2], config)]
    assert beams(session) == beams(eager)
    assert runner.decoding.made > 1 and runner.decoding.failed is None
