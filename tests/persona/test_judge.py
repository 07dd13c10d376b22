"""The optional judge: its answers parsed, and a real OpenAI-compatible endpoint (roletune serve of a demo
run, whose answers hold no score) counted as unparsed, cached, and never a crash."""
import json

import pytest

from conftest import requests_heard
from roletune.evaluate import evaluate
from roletune.persona.judge import parse
from roletune.serve import client


@pytest.mark.parametrize("answer, score", [
    ("Score: 4", 4), ("score:5", 5), ("评分：3", 3), ("2/5", 2), ("  1 \n", 1), ("I would say 4/5 overall.", 4),
    ("Score: 7", None), ("Score: 45", None), ("4.5", None), ("a fine reply", None), ("", None),
])
def test_a_judges_answer_is_read_for_its_score(answer, score):
    assert parse(answer) == score


@pytest.mark.slow
def test_a_judge_without_scores_is_counted_and_each_reply_is_asked_once(server, trained_run, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"第{i}个问题：今天海上风大吗？", "output": f"风有{i}级。"},
                                       ensure_ascii=False) + "\n" for i in (3, 4)), encoding="utf-8")
    asked = requests_heard(server)
    for rerun in (False, True):
        evaluate(str(trained_run), data=str(rows), out=str(tmp_path / "eval"), overwrite=rerun, device="cpu",
                 max_new_tokens=8, judge=f"{server}/v1", judge_model="keeper", echo=lambda *_: None)
        found = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["persona"]
        # The demo run answers 风有…级 to anything: no score, so every judgment is unparsed and none is a score.
        assert {k: found["judge"][k] for k in ("parsed", "unparsed", "cached")} == \
            {"parsed": 0, "unparsed": 4, "cached": 4 if rerun else 0}
        assert found["tuned"]["judge_score"] is None and found["tuned"]["judge_scores"] == [None, None]
        # The first eval asked the server once per reply (2 rows, base and tuned); the second asked nothing.
        assert requests_heard(server) == asked + 4
    assert "Judge: keeper at" in (tmp_path / "eval" / "eval.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_judge_that_never_answers_leaves_the_eval_standing(trained_run, tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setattr(client, "RETRIES", 0)
    lines = []
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "今天海上风大吗？", "output": "风有3级。"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    evaluate(str(trained_run), data=str(rows), out=str(tmp_path), device="cpu", max_new_tokens=4,
             echo=lines.append, judge=f"http://127.0.0.1:{free_port()}/v1", judge_model="nobody")
    found = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert "error" in found["persona"]["judge"] and found["models"]["tuned"]["loss"] > 0
    assert any(line.startswith("the judge was not heard, and the eval goes on without it:") for line in lines)
