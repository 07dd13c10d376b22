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
    (["model.path=/nonexistent/model"], ["/nonexistent/model: no such folder"]),
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


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"roletune {version('roletune')}"


def test_output_to_a_reader_that_is_gone_goes_nowhere_and_the_work_goes_on():
    import os

    from roletune.terminal import OutlivesReader

    read, write = os.pipe()
    stream = OutlivesReader(os.fdopen(write, "w"))
    stream.write("first line\n")
    stream.flush()
    os.close(read)  # the reader (tee, head) exits
    for _ in range(3):
        assert stream.write("x" * 100_000) == 100_000  # more than a pipe buffers: the write reaches the pipe
        stream.flush()
    assert stream.isatty() is False


@pytest.mark.slow
def test_ctrl_c_through_a_dying_pipe_still_leaves_a_checkpoint_that_resumes(config_file, tmp_path):
    """`roletune train ... 2>&1 | tee log`, then Ctrl-C: the signal ends tee as well, so the checkpoint the
    signal asked for is saved while every write to the pipe fails."""
    import signal
    import subprocess
    import sys

    from roletune import train
    from roletune.config import load_config
    from roletune.training import checkpoints

    path = config_file(train={"max_steps": 60, "save_steps": 1000, "logging_steps": 1})
    child = subprocess.Popen([sys.executable, "-m", "roletune", "train", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in child.stdout:
            if "loss" in line:  # the first step's log: training is under way
                break
        child.stdout.close()  # tee is gone
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=180) == 130
    finally:
        child.kill()
    cfg = load_config(path)
    saved = sorted(Path(cfg.output_dir).glob("checkpoint-*"))
    assert len(saved) == 1 and checkpoints.problem(str(saved[0])) is None
    assert not (Path(cfg.output_dir) / "adapter_model.safetensors").exists()  # stopped, not finished
    assert train.run(cfg, resume="latest", echo=lambda *_: None).optimizer_steps == 60


def test_preview_of_a_bare_data_file_shows_layout_counts_and_records_without_a_model(write_json, persona_rows,
                                                                                      capsys):
    path = write_json([*persona_rows[:3], {"instruction": "", "input": "", "output": "先开口"}], "bare.json")
    assert main(["data", "preview", str(path), "-n", "2", "data.system_prompt=你是守灯人。"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 4 records, layout alpaca (detected; data.format sets it); 1 left out with an empty prompt"
    assert out[1:5] == ["--- conversation 0 ---", "system: 你是守灯人。", "user: 第0个问题：今天海上风大吗？",
                        "assistant: 风有0级，灯塔照常亮着。"]
    assert out.count("--- conversation 1 ---") == 1 and "--- conversation 2 ---" not in out
    assert "⟦" not in "\n".join(out) and out[-1].startswith("tokens and the trained spans: add --model")


def test_preview_of_a_bare_data_file_with_a_model_marks_the_trained_tokens(write_json, persona_rows, tiny_model,
                                                                            capsys):
    path = write_json(persona_rows[:2], "bare.jsonl", jsonl=True)
    assert main(["data", "preview", str(path), "--model", str(tiny_model), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "examples: 2 read, 2 kept" in out and "⟦风有0级，灯塔照常亮着。<|im_end|>⟧" in out
