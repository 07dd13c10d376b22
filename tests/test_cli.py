"""The command line as a user meets it: bad input gives one clear line on stderr and writes nothing."""
import json
from pathlib import Path

import pytest

from roletune.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roletune: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_DATA = {
    "malformed_json": ("rows.json", '[{"instruction": "q", "output": "a"},\n {"instruction": }]',
                       ["rows.json", "line 2", "invalid JSON"]),
    "malformed_jsonl": ("rows.jsonl", '{"instruction": "q", "output": "a"}\n{oops\n', ["rows.jsonl", "line 2"]),
    "missing_field": ("rows.json", json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}]),
                      ["rows.json", "record 1", "field output: missing"]),
    "wrong_type": ("rows.json", json.dumps([{"instruction": ["q"], "output": "a"}]),
                   ["record 0", "field instruction: expected a string, got list"]),
    "empty_reply": ("rows.json", json.dumps([{"instruction": "q", "output": ""}]), ["record 0", "empty reply"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_and_writes_nothing(capsys, tmp_path, config_file, case):
    name, text, fragments = BAD_DATA[case]
    config = config_file()
    data = write(tmp_path / name, text)
    code, _, err = run_cli(capsys, "train", config, f"data.path={data}")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, fragments", [
    (["data.format=xml"], ["data.format='xml': expected one of auto, alpaca, sharegpt, messages"]),
    (["data.path=/nonexistent/rows.json"], ["/nonexistent/rows.json: file not found"]),
    (["data.path=http://127.0.0.1:9/rows.json"], ["http://127.0.0.1:9/rows.json: cannot reach it"]),
    (["train.learning_rate=1e-4"], ["unknown key train.learning_rate"]),
    (["train.lr"], ["override 'train.lr' is not of the form key.sub=value"]),
    (["train.batch_size=many"], ["train.batch_size='many': expected an integer"]),
    (["model.path=/nonexistent/model"], ["/nonexistent/model: cannot load the tokenizer"]),
])
def test_bad_settings_are_one_line_and_write_nothing(capsys, tmp_path, config_file, overrides, fragments):
    code, _, err = run_cli(capsys, "train", config_file(), *overrides)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_the_file(capsys, tmp_path, config_file):
    config = config_file()
    write(config, config.read_text(encoding="utf-8") + "extra_section: {a: 1}\n")
    code, _, err = run_cli(capsys, "train", config)
    assert_one_line_error(code, err, str(config), "unknown key extra_section")


def test_stray_flag_is_a_usage_error(capsys, config_file):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(config_file()), "--frobnicate"])
    assert exit_.value.code == 2


def test_data_preview_marks_trained_tokens(capsys, config_file):
    code, out, _ = run_cli(capsys, "data", "preview", config_file(), "-n", "2")
    assert code == 0
    assert out.count("--- example") == 2
    assert "<|im_start|>assistant\n⟦风有0级，灯塔照常亮着。<|im_end|>⟧" in out


def test_data_preview_json_gives_ids_and_labels(capsys, config_file):
    code, out, _ = run_cli(capsys, "data", "preview", config_file(), "-n", "3", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"])
        trained = [label for label in row["labels"] if label != -100]
        assert trained and trained[-1] == 151645  # every reply ends with a trained <|im_end|>


def test_config_lists_keys_and_resolves_files(capsys, config_file):
    code, out, _ = run_cli(capsys, "config")
    assert code == 0 and "train.lr = 0.0001" in out
    code, out, _ = run_cli(capsys, "config", config_file(), "train.lr=3e-4")
    assert code == 0 and "lr: 0.0003" in out


def test_an_override_after_resume_is_an_override(config_file, monkeypatch):
    from roletune import train

    seen = {}
    monkeypatch.setattr(train, "run", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    assert main(["train", str(config_file()), "--resume", "train.lr=0.25"]) == 0
    assert seen["resume"] == "latest" and seen["cfg"].train.lr == 0.25
    assert main(["train", str(config_file()), "--resume", "runs/x/checkpoint-4"]) == 0
    assert seen["resume"] == "runs/x/checkpoint-4"
