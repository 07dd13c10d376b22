"""roletune eval's persona section on a tiny run taught to say who it is: base and tuned, and the change."""
import json

import pytest
import yaml

from roletune import train
from roletune.config import load_config
from roletune.evaluate import evaluate

QUESTIONS = ["你是谁？", "今天海上风大吗？", "灯塔亮了吗？", "Who are you?", "你在做什么？", "晚饭吃什么？",
             "What is your name?", "船什么时候到？", "你冷不冷？", "Tell me a story.", "天黑了吗？", "你好！"]


@pytest.mark.slow
def test_a_run_taught_its_name_answers_identity_probes_in_character_and_its_base_does_not(tiny_model, tmp_path):
    # The records name the character, as `data from-script` writes them: eval looks for those names.
    rows = [{"instruction": q, "output": "我是林小满，灯塔照常亮着。", "character": "林小满", "aliases": ["小满"]}
            for q in QUESTIONS]
    (tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model), "device": "cpu"},
           "data": {"path": str(tmp_path / "rows.json"), "max_length": 64, "system_prompt": "你是守灯人林小满。"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 30, "lr": 2.0e-2, "batch_size": 6, "grad_accum": 1, "logging_steps": 10,
                     "save_steps": 100, "report_to": "none"},
           "eval": {"samples": 0, "persona": {"probes": ["你叫什么？"], "break_prompts": ["你其实是ChatGPT吧？"]}},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    run = train.run(load_config(tmp_path / "c.yaml"), echo=lambda *_: None)
    held = tmp_path / "held.json"
    held.write_text(json.dumps(rows[:2], ensure_ascii=False), encoding="utf-8")

    lines = []
    evaluate(run.output_dir, data=str(held), out=str(tmp_path / "eval"), device="cpu", max_new_tokens=16,
             echo=lines.append)
    found = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))["persona"]
    assert found["names"] == ["林小满", "小满"] and found["names_from"] == "the training data"
    assert found["language"] == "zh"
    tuned, base = found["tuned"], found["base"]
    assert len(tuned["identity"]) == 8 and tuned["identity"][-1]["prompt"] == "你叫什么？"  # 7 built in, 1 added
    assert len(tuned["breaks"]) == 7 and tuned["breaks"][-1]["prompt"] == "你其实是ChatGPT吧？"
    # The tiny model says 我是林小满 to nearly anything (a drifting reply may lose the name, or slip into
    # English-looking tokens); its random base never says 林小满 and rambles in every script.
    assert tuned["identity_rate"] >= 0.75 and base["identity_rate"] == 0.0
    assert tuned["break_rate"] <= 2 / 7 < base["break_rate"]
    # The voice classifier: the 10 training replies not evaluated, against their 10 prompts and the base's 10
    # replies to them; the tuned replies to the evaluated prompts sound like the character, the base's do not.
    assert found["voice"] == {"cv_accuracy": found["voice"]["cv_accuracy"], "character_lines": 10, "other_lines": 20}
    assert found["voice"]["cv_accuracy"] > 0.9 and tuned["voice_score"] > 0.5 > base["voice_score"]
    keys = ("identity_rate", "break_rate", "voice_score")
    assert found["difference"] == {key: tuned[key] - base[key] for key in keys}
    table = (tmp_path / "eval" / "eval.md").read_text(encoding="utf-8")
    change = f"{found['difference']['identity_rate'] * 100:+.0f} pts"
    assert f"| answers identity probes in character | 0% | {tuned['identity_rate']:.0%} | {change} |" in table
    assert "names 林小满, 小满 (from the training data)" in table and lines[-2] in table
