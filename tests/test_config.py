from pathlib import Path

import pytest

from roletune.config import Config, config_from_dict, describe, load_config
from roletune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "m"}, "data": {"path": "d.json"}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_seed_config_is_the_seed_recipe():
    cfg = load_config(ROOT / "configs" / "huanhuan-qwen2.5-7b.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.data.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"
    assert cfg.data.max_length == 384
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32.0, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.epochs, t.lr) == (4, 4, 3.0, 1e-4)
    assert (t.gradient_checkpointing, t.logging_steps, t.save_steps) == (True, 10, 100)


def test_overrides_go_on_top_and_are_typed():
    cfg = config_from_dict(MINIMAL, ["train.lr=2e-4", "model.device=cuda:1", "train.max_steps=5",
                                     "lora.target_modules=q_proj,v_proj", "data.system_prompt=你好"])
    assert cfg.train.lr == 2e-4  # YAML reads 2e-4 as a string; the schema makes it a float
    assert cfg.model.device == "cuda:1"
    assert cfg.train.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "你好"


def test_every_problem_is_reported_together():
    raw = {"model": {"path": "m", "dtype": "int3"}, "data": {"path": "d", "max_length": -1},
           "train": {"lrr": 1, "batch_size": "four"}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, ["lora.r=0"])
    message = str(err.value)
    assert "\n" not in message
    for part in ["model.dtype='int3'", "data.max_length=-1: must be > 0", "unknown key train.lrr",
                 "did you mean train.lr?", "train.batch_size='four': expected an integer", "lora.r=0"]:
        assert part in message


def test_required_keys_and_bad_override_form():
    with pytest.raises(ConfigError, match="model.path is required"):
        config_from_dict({"data": {"path": "d"}})
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        config_from_dict(MINIMAL, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key nosuch"):
        config_from_dict(MINIMAL, ["nosuch.key=1"])


def test_grouped_lora_branches_need_the_fused_ones():
    with pytest.raises(ConfigError, match="lora.grouped needs lora.fused=true"):
        config_from_dict(MINIMAL, ["lora.grouped=true", "lora.fused=false"])
    assert config_from_dict(MINIMAL, ["lora.grouped=true"]).lora.grouped


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(bad)


def test_every_key_is_documented():
    rows = describe()
    assert {"model.path", "model.tokenizer", "model.device", "data.path", "data.system_prompt", "data.max_length",
            "output_dir", "lora.r", "lora.alpha", "lora.dropout", "train.epochs", "train.lr", "train.batch_size",
            "train.grad_accum", "train.save_steps", "train.seed", "train.max_steps"} <= {key for key, _, _ in rows}
    assert all(help_text for _, _, help_text in rows)


def test_fast_config_keeps_the_seed_optimization():
    """Only how a step is computed differs: the same rows per optimizer step, model, data, LoRA and schedule."""
    import dataclasses

    from roletune.training import distributed

    seed, fast = (load_config(ROOT / "configs" / name) for name in ("huanhuan-qwen2.5-7b.yaml",
                                                                     "huanhuan-qwen2.5-7b-fast.yaml"))
    assert (fast.model, fast.data, fast.lora, fast.eval) == (seed.model, seed.data, seed.lora, seed.eval)
    same = ["epochs", "max_steps", "lr", "lr_scheduler", "warmup", "weight_decay", "max_grad_norm", "optim", "seed"]
    assert [getattr(fast.train, k) for k in same] == [getattr(seed.train, k) for k in same]
    for world in (1, 2, 4):  # however many GPUs share the micro-batches, a step takes 16 rows
        per_device = dataclasses.replace(fast.train, batch_size=16 // world)
        rows = per_device.batch_size * distributed.grad_accum(per_device, world) * world
        assert rows == seed.train.batch_size * seed.train.grad_accum == 16, world
    assert fast.train.gradient_checkpointing == "auto" and fast.train.batch_size == 16


def test_a_bad_override_is_named_as_the_command_lines_and_a_bad_file_key_as_the_files():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**MINIMAL, "train": {"epochs": "many"}}, ["train.batch_size=lots", "lora.r=4"],
                         source="c.yaml")
    assert str(caught.value) == ("c.yaml: train.epochs='many': expected a number; "
                                 "command-line override: train.batch_size='lots': expected an integer")
    with pytest.raises(ConfigError, match=r"^command-line override: unknown key train.learning_rate$"):
        config_from_dict(MINIMAL, ["train.learning_rate=1e-4"], source="c.yaml")
