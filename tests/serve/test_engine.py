"""The serving engine in-process: requests that wait together are answered in one generate() call, each
row with its own adapter, max_tokens and stream, and each answer is the one it gets alone."""
import queue

import pytest

from roletune.serve.engine import Answer, Busy, Engine

QUESTIONS = [f"第{i}个问题：今天海上风大吗？" for i in range(8)]


def collect(out: queue.Queue) -> tuple[str, Answer]:
    text = ""
    while not isinstance(item := out.get(timeout=120), Answer):
        assert not isinstance(item, Exception), item
        text += item
    return text, item


@pytest.fixture(scope="module")
def engine(trained_run):
    return Engine([(None, str(trained_run))], device="cpu", queue_size=10)


def submit(engine, character, text, **settings) -> queue.Queue:
    out = queue.Queue()
    engine.submit(character, engine.prompt_ids(character, [{"role": "user", "content": text}]), out.put, **settings)
    return out


def ask_all(engine, characters):
    return [submit(engine, characters[i % 2], q, max_tokens=6 + i, temperature=0) for i, q in enumerate(QUESTIONS)]


def test_waiting_requests_share_a_batch_and_each_gets_its_own_answer(engine, trained_run, tiny_model):
    characters = [engine.characters[trained_run.name], engine.characters[tiny_model.name]]  # adapter, base
    alone = []
    for i, question in enumerate(QUESTIONS):  # one at a time: each waits for the one before
        alone.append(collect(submit(engine, characters[i % 2], question, max_tokens=6 + i, temperature=0)))
    engine.batch_sizes.clear()
    busy = submit(engine, characters[1], "讲个很长的故事。", max_tokens=64, temperature=0)
    assert isinstance(busy.get(timeout=60), str)  # the worker is on this one while the eight below arrive
    together = [collect(out) for out in ask_all(engine, characters)]
    collect(busy)
    assert engine.batch_sizes == [1, 8]
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert [(a.finish_reason, a.completion_tokens) for _, a in together] == \
        [(a.finish_reason, a.completion_tokens) for _, a in alone]
    assert together[0][0].startswith("风有") and together[1][1].finish_reason == "length"  # the base rambles on


def test_requests_read_together_by_an_idle_engine_decode_together(engine, trained_run, tiny_model):
    """The web page sends its two panes' requests a moment apart: while the server still reads the second,
    the idle worker waits for it. A request whose reading never ends holds the worker up GATHER_MORE at most."""
    engine.batch_sizes.clear()
    with engine.arriving(), engine.arriving():  # as the API does from a request's first byte to submit()
        outs = [submit(engine, engine.characters[name], QUESTIONS[0], max_tokens=8, temperature=0)
                for name in (trained_run.name, tiny_model.name)]
    assert [collect(out)[0] for out in outs][0].startswith("风有")
    with engine.arriving():
        collect(submit(engine, engine.characters[tiny_model.name], QUESTIONS[1], max_tokens=8, temperature=0))
    assert engine.batch_sizes == [2, 1]


def test_a_cancelled_request_stops_decoding_and_one_still_waiting_is_dropped(engine, tiny_model):
    base = engine.characters[tiny_model.name]
    out = queue.Queue()
    job = engine.submit(base, engine.prompt_ids(base, [{"role": "user", "content": "讲个很长的故事。"}]), out.put,
                        max_tokens=2000, temperature=0)
    assert isinstance(out.get(timeout=60), str)
    job.cancelled = True  # as the API does when the client goes away
    text, answer = collect(out)
    assert answer.completion_tokens < 100  # the base rambles on to max_tokens otherwise
    engine.batch_sizes.clear()
    first = submit(engine, base, "讲个很长的故事。", max_tokens=64, temperature=0)
    assert isinstance(first.get(timeout=60), str)
    gone = engine.submit(base, engine.prompt_ids(base, [{"role": "user", "content": "x"}]), queue.Queue().put,
                         max_tokens=8, temperature=0)
    gone.cancelled = True
    collect(first)
    collect(submit(engine, base, "x", max_tokens=2, temperature=0))
    assert engine.batch_sizes == [1, 1] and engine.waiting == 0


def test_a_full_queue_says_busy(engine, tiny_model):
    base = engine.characters[tiny_model.name]
    outs = [submit(engine, base, "讲个故事。", max_tokens=32, temperature=0) for _ in range(10)]
    with pytest.raises(Busy):
        submit(engine, base, "x", max_tokens=1)
    for out in outs:
        collect(out)
    collect(submit(engine, base, "x", max_tokens=1))  # room again


def test_runs_on_different_bases_are_refused_in_one_line(trained_run, tiny_model, tmp_path):
    import shutil

    import yaml

    from roletune.errors import RunError

    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    shutil.copytree(tiny_model, tmp_path / "another-base")
    record = yaml.safe_load((other / "roletune.yaml").read_text(encoding="utf-8"))
    record["model"]["path"] = str(tmp_path / "another-base")
    (other / "roletune.yaml").write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RunError, match=r"^the runs were trained on different bases \(.*; serve each base on its own"):
        Engine([(None, str(trained_run)), (None, str(other))], device="cpu")
    with pytest.raises(RunError, match=r"two runs are both named run; name them: NAME=RUN"):
        Engine([(None, str(trained_run)), (None, str(trained_run))], device="cpu")


def test_run_names_and_an_open_host_without_a_key_warns(monkeypatch, caplog):
    import roletune.serve as serving
    import roletune.serve.engine

    assert serving.parse_runs(["runs/a", "zhen=runs/b"]) == [(None, "runs/a"), ("zhen", "runs/b")]

    class Stub:
        characters = {"m": None}

        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(roletune.serve.engine, "Engine", Stub)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    monkeypatch.setattr("roletune.serve.app.create_app", lambda *args, **kwargs: None)
    monkeypatch.delenv("ROLETUNE_API_KEY", raising=False)
    serving.serve(["x"], host="0.0.0.0", echo=lambda *_: None)
    assert "--host 0.0.0.0 takes requests from other machines and no API key is set" in caplog.text
    caplog.clear()
    serving.serve(["x"], host="127.0.0.1", echo=lambda *_: None)
    serving.serve(["x"], host="0.0.0.0", api_key="k", echo=lambda *_: None)
    assert "no API key" not in caplog.text
