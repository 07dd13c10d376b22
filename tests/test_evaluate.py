import json
from pathlib import Path

import pytest

from roletune import train
from roletune.cli import main
from roletune.config import load_config
from roletune.errors import DataError, RunError
from roletune.evaluate import evaluate

METRICS = {"loss", "perplexity", "bleu4", "rouge_l", "distinct_1", "distinct_2", "mean_length", "stop_rate"}


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory, tiny_model):
    import yaml

    folder = tmp_path_factory.mktemp("eval")
    rows = [{"instruction": f"第{i}个问题：今天海上风大吗？", "output": f"风有{i}级，灯塔照常亮着。"} for i in range(15)]
    (folder / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    raw = {"model": {"path": str(tiny_model), "device": "cpu"},
           "data": {"path": str(folder / "rows.json"), "max_length": 64, "eval_size": 0.2,
                    "system_prompt": "你是守灯人。"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 30, "lr": 2.0e-2, "batch_size": 6, "grad_accum": 1, "logging_steps": 4,
                     "save_steps": 100, "report_to": "none"},
           "eval": {"steps": 30, "samples": 0}, "output_dir": str(folder / "run")}
    (folder / "c.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return train.run(load_config(folder / "c.yaml"), echo=lambda *_: None)


@pytest.mark.slow
def test_eval_reports_every_metric_for_both_models(heldout_run, capsys):
    report = evaluate(heldout_run.output_dir, device="cpu", max_new_tokens=16)
    out = Path(heldout_run.output_dir)
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert saved["rows"] == 3  # 20% of 15, drawn with train.seed and saved with the run
    for name in ("base", "tuned"):
        assert METRICS <= set(saved["models"][name])
        assert len(saved["models"][name]["replies"]) == 3
    tuned, base = saved["models"]["tuned"], saved["models"]["base"]
    # The same rows and mask as the Trainer's eval loss at the last step.
    assert tuned["loss"] == pytest.approx(heldout_run.summary["final_eval_loss"], abs=1e-4)
    assert tuned["loss"] < base["loss"]
    assert tuned["stop_rate"] > base["stop_rate"]
    table = (out / "eval.md").read_text(encoding="utf-8")
    assert "| BLEU-4 |" in table and "| stopped at end-of-turn |" in table
    assert "| reply loss |" in capsys.readouterr().out
    assert report["models"]["tuned"]["bleu4"] == saved["models"]["tuned"]["bleu4"]


@pytest.mark.slow
def test_eval_never_overwrites_silently(heldout_run, tmp_path):
    evaluate(heldout_run.output_dir, device="cpu", max_new_tokens=4, out=str(tmp_path), echo=lambda *_: None)
    with pytest.raises(RunError, match="eval.json: exists; pass --overwrite"):
        evaluate(heldout_run.output_dir, device="cpu", out=str(tmp_path))
    evaluate(heldout_run.output_dir, device="cpu", max_new_tokens=4, n=1, out=str(tmp_path), overwrite=True,
             echo=lambda *_: None)
    assert json.loads((tmp_path / "eval.json").read_text())["rows"] == 1


def test_eval_on_a_given_file(trained_run, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "第3个问题：今天海上风大吗？", "output": "风有3级，灯塔照常亮着。"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["eval", str(trained_run), "--data", str(rows), "--out", str(tmp_path), "--device", "cpu",
                 "--max-new-tokens", "16"]) == 0
    tuned = json.loads((tmp_path / "eval.json").read_text())["models"]["tuned"]
    assert tuned["stop_rate"] == 1.0 and tuned["rouge_l"] > 50  # "风有…级，灯塔照常亮着。"


def test_eval_bad_inputs_are_one_line(trained_run, tiny_model, tmp_path, capsys):
    cases = [
        (["eval", str(trained_run)], "no held-out split"),
        (["eval", str(tiny_model)], "this is a plain model"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n', encoding="utf-8")
    cases.append((["eval", str(trained_run), "--data", str(bad), "--out", str(tmp_path / "o")],
                  "bad.jsonl: line 2: invalid JSON"))
    for argv, fragment in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_eval_size_larger_than_the_data(config_file):
    with pytest.raises(DataError, match=r"data.eval_size=12 holds out 12 of 12 rows"):
        train.run(load_config(config_file(data={"eval_size": 12})))


def test_unknown_tracker_is_a_config_error(config_file, capsys):
    assert main(["train", str(config_file()), "train.report_to=wandb"]) == 1
    assert "train.report_to='wandb': expected one of swanlab, tensorboard, none" in capsys.readouterr().err


def test_plot_redraws_and_overlays(heldout_run, trained_run, tmp_path, capsys):
    assert main(["plot", heldout_run.output_dir]) == 0
    assert main(["plot", heldout_run.output_dir, str(trained_run), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", heldout_run.output_dir, str(trained_run)]) == 1
    assert "pass --out" in capsys.readouterr().err
