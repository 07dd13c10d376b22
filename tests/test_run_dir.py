"""Runs that travel: a run folder used from another folder or machine, with another copy of its base, and
one clear line for a base or adapter file that is missing or damaged."""
import os
import shutil

import pytest
import yaml

from roletune import train
from roletune.cli import main
from roletune.config import config_from_dict
from roletune.run_dir import with_absolute_paths

from conftest import LIGHTHOUSE_SYSTEM

QUESTION = "第3个问题：今天海上风大吗？"


def test_local_paths_are_recorded_absolute_and_hub_ids_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "rows.json").write_text("[]")
    cfg = config_from_dict({"model": {"path": "base", "tokenizer": "Qwen/Qwen2.5-7B-Instruct"},
                            "data": {"path": "./rows.json"}})
    located = with_absolute_paths(cfg)
    assert located.model.path == str(tmp_path / "base") and located.data.path == str(tmp_path / "rows.json")
    assert located.model.tokenizer == "Qwen/Qwen2.5-7B-Instruct"
    remote = config_from_dict({"model": {"path": "modelscope:Qwen/Qwen2.5-7B-Instruct"},
                               "data": {"path": "https://example.org/rows.json"}})
    assert with_absolute_paths(remote) == remote


def test_a_run_trained_with_relative_paths_answers_from_another_folder(tiny_model, tmp_path, monkeypatch, capsys,
                                                                        persona_rows):
    import json

    home = tmp_path / "clone"
    home.mkdir()
    os.symlink(tiny_model, home / "model")
    (home / "rows.json").write_text(json.dumps(persona_rows, ensure_ascii=False), encoding="utf-8")
    monkeypatch.chdir(home)
    cfg = config_from_dict({"model": {"path": "model", "device": "cpu"},
                            "data": {"path": "rows.json", "system_prompt": LIGHTHOUSE_SYSTEM, "max_length": 64},
                            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "train": {"max_steps": 2, "batch_size": 4, "report_to": "none", "save_steps": 100},
                            "output_dir": "runs/moved"})
    train.run(cfg, echo=lambda *_: None)
    saved = yaml.safe_load((home / "runs" / "moved" / "roletune.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["path"] == str(home / "model") and saved["data"]["path"] == str(home / "rows.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["chat", str(home / "runs" / "moved"), "--prompt", QUESTION, "--device", "cpu", "--greedy",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()


@pytest.fixture(scope="module")
def copied_run(trained_run, tmp_path_factory):
    """The trained run as it arrives on another machine: its recorded base is not there."""
    moved = tmp_path_factory.mktemp("copied") / "run"
    shutil.copytree(trained_run, moved)
    record = yaml.safe_load((moved / "roletune.yaml").read_text(encoding="utf-8"))
    record["model"]["path"] = "/models/on/the/training/machine"
    (moved / "roletune.yaml").write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")
    return moved


@pytest.mark.parametrize("verb", ["chat", "compare", "generate", "eval", "merge"])
def test_every_verb_that_reads_a_run_takes_another_copy_of_its_base(copied_run, tiny_model, tmp_path, verb, capsys,
                                                                     write_json, persona_rows):
    rows = str(write_json(persona_rows[:2], "rows.json"))
    prompts = write_json([{"prompt": QUESTION}], "prompts.jsonl", jsonl=True)
    extra = {"chat": ["--prompt", QUESTION, "--max-new-tokens", "4"],
             "compare": ["--prompt", QUESTION, "--max-new-tokens", "4"],
             "generate": ["--input", str(prompts), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"],
             "eval": ["--data", rows, "--max-new-tokens", "4", "--out", str(tmp_path / "eval")],
             "merge": ["--out", str(tmp_path / "merged"), "--dtype", "fp32"]}[verb]
    assert main([verb, str(copied_run), "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its base model /models/on/the/training/machine" in err[0] and "--base-model" in err[0]
    assert main([verb, str(copied_run), "--device", "cpu", "--base-model", str(tiny_model), *extra]) == 0
    assert capsys.readouterr().err.count("Traceback") == 0


def test_base_model_goes_with_a_run_or_adapter_only(tiny_model, capsys):
    assert main(["chat", str(tiny_model), "--base-model", str(tiny_model), "--prompt", "x", "--device", "cpu"]) == 1
    assert "--base-model goes with a run or adapter folder" in capsys.readouterr().err


@pytest.fixture
def truncated_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    adapter = run / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:adapter.stat().st_size // 2])
    return run


@pytest.mark.parametrize("verb", ["chat", "compare", "generate", "eval", "merge"])
def test_a_truncated_adapter_is_one_line_naming_the_file_in_every_verb(truncated_run, tmp_path, verb, capsys,
                                                                       write_json, persona_rows):
    extra = {"chat": ["--prompt", QUESTION], "compare": ["--prompt", QUESTION],
             "generate": ["--input", str(write_json([{"prompt": QUESTION}], "p.jsonl", jsonl=True)),
                          "--output", str(tmp_path / "out.jsonl")],
             "eval": ["--data", str(write_json(persona_rows[:2], "rows.json")), "--out", str(tmp_path / "eval")],
             "merge": ["--out", str(tmp_path / "merged")]}[verb]
    assert main([verb, str(truncated_run), "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{truncated_run / 'adapter_model.safetensors'}: truncated (" in err[0]
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.jsonl").exists()


def test_a_damaged_base_weight_file_is_one_line_naming_it(trained_run, tiny_model, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    weights = base / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)
    assert main(["chat", str(trained_run), "--base-model", str(base), "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights}: not a safetensors file (its header is unreadable)" in err[0]


def test_a_whole_safetensors_file_has_no_problem_and_each_cut_of_it_has_one(tiny_model, tmp_path):
    from roletune.model import safetensors_problem

    whole = (tiny_model / "model.safetensors").read_bytes()
    assert safetensors_problem(tiny_model / "model.safetensors") is None
    for size in (0, 7, 100, len(whole) - 1):
        cut = tmp_path / f"cut-{size}.safetensors"
        cut.write_bytes(whole[:size])
        assert safetensors_problem(cut).startswith("truncated ("), size
