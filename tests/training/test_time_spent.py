import json
import time
from pathlib import Path

import pytest
from transformers import Trainer

from roletune import run_dir, train
from roletune.config import load_config
from roletune.training import batching, samples
from roletune.training.time_spent import TimedWork, TimeSpent

PAUSE = 0.25  # seconds added to each timed piece of work: far above what the tiny model's own takes


def test_time_spent_adds_up_per_kind_and_the_steps_get_the_rest():
    spent = TimeSpent()
    for _ in range(2):
        with spent.on("checkpoints"):
            time.sleep(0.05)
    with spent.on("evaluation"):
        with spent.on("evaluation"):  # e.g. waiting for a checkpoint's seal while saving the next: counted once
            time.sleep(0.1)
    figures = spent.summary(wall_s=1.0)
    assert 0.1 <= figures["checkpoints_s"] <= 0.2 and 0.1 <= figures["evaluation_s"] <= 0.15
    assert figures["sample_answers_s"] == 0
    assert figures["steps_s"] == pytest.approx(1.0 - figures["checkpoints_s"] - figures["evaluation_s"], abs=0.11)
    assert "setup_s" not in figures  # setup_done() was never called
    with pytest.raises(ValueError, match="unknown kind"):
        spent.on("logging").__enter__()


@pytest.mark.slow
def test_the_summary_says_how_long_samples_evaluation_and_checkpoints_took(config_file, monkeypatch):
    calls = {"sample_answers": 0, "evaluation": 0, "checkpoints": 0}
    measured = dict.fromkeys(calls, 0.0)  # each kind's timed calls, timed from outside the summary's own timer
    depth = dict.fromkeys(calls, 0)

    def slowed(kind, work):
        def run(*args, **kwargs):
            calls[kind] += 1
            time.sleep(PAUSE)
            return work(*args, **kwargs)
        return run

    def stopwatch(kind, work):  # a call within a call of the same kind counts once, as in the summary
        def run(*args, **kwargs):
            depth[kind] += 1
            started = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                depth[kind] -= 1
                if not depth[kind]:
                    measured[kind] += time.perf_counter() - started
        return run

    monkeypatch.setattr(samples, "answer_all", slowed("sample_answers", samples.answer_all))
    monkeypatch.setattr(batching.HeldOutLoss, "evaluation_loop",
                        slowed("evaluation", batching.HeldOutLoss.evaluation_loop))
    # A checkpoint's files are written on the training thread (its seal runs beside the steps: not slowed here).
    monkeypatch.setattr(Trainer, "_save_rng_state", slowed("checkpoints", Trainer._save_rng_state))
    monkeypatch.setattr(samples.SampleAnswers, "generate", stopwatch("sample_answers", samples.SampleAnswers.generate))
    monkeypatch.setattr(TimedWork, "evaluate", stopwatch("evaluation", TimedWork.evaluate))
    for name in ("_save_checkpoint", "wait_for_checkpoints"):
        monkeypatch.setattr(TimedWork, name, stopwatch("checkpoints", getattr(TimedWork, name)))
    cfg = load_config(config_file(data={"eval_size": 2}, eval={"samples": 2, "max_new_tokens": 4}))
    summary = train.run(cfg, echo=lambda *_: None).summary

    assert calls == {"sample_answers": 3, "evaluation": 2, "checkpoints": 3}  # before training, 2 epochs; steps 2, 4, 6
    for kind, count in calls.items():
        assert count * PAUSE <= summary[f"{kind}_s"] + 0.05, (kind, summary)
        # The summary (to 0.1 s) holds the timed calls and nothing else, however busy the machine is.
        assert summary[f"{kind}_s"] == pytest.approx(measured[kind], abs=0.06), (kind, summary, measured)
    parts = summary["steps_s"] + sum(summary[f"{kind}_s"] for kind in calls)
    assert parts == pytest.approx(summary["wall_time_s"], abs=0.25)
    # The steps' share leaves out every pause: 8 of them, 2 s in all.
    assert summary["steps_s"] <= summary["wall_time_s"] - 8 * PAUSE + 0.1
    assert 0 < summary["setup_s"] < 60  # loading the tiny model and tokenizing, before train(): not in wall_time_s
    saved = json.loads((Path(cfg.output_dir) / run_dir.SUMMARY_NAME).read_text())
    assert {k: saved[k] for k in ("steps_s", "sample_answers_s", "evaluation_s", "checkpoints_s")} == \
        {k: summary[k] for k in ("steps_s", "sample_answers_s", "evaluation_s", "checkpoints_s")}
