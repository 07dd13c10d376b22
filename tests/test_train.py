import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from roletune import run_dir, train
from roletune.config import load_config
from roletune.errors import RunError
from roletune.training import checkpoints

from conftest import assert_close_at_scale

ROOT = Path(__file__).resolve().parents[1]


def adapter(run: Path) -> dict:
    return load_file(run / "adapter_model.safetensors")


def test_tiny_model_learns_and_the_run_folder_is_complete(config_file, capsys):
    cfg = load_config(config_file(train={"max_steps": 8, "lr": 1.0e-2, "epochs": 1}))
    result = train.run(cfg)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < first - 0.05, result.losses
    out = Path(cfg.output_dir)
    for name in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "roletune.yaml"]:
        assert (out / name).is_file(), name
    assert run_dir.read_config(out) == cfg  # what later commands read back is what training used
    manifest = json.loads((out / "checkpoint-2" / checkpoints.MANIFEST).read_text())
    assert "roletune.yaml" in manifest["files"]  # written inside the checkpoint before it was sealed
    assert run_dir.read_config(out / "checkpoint-2") == cfg
    assert "trainable params: " in capsys.readouterr().out


class Interrupt(TrainerCallback):
    """Stand-in for a crash: stop the process right after the checkpoint at `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("resume_from", ["latest", "checkpoint-2"])
def test_resume_after_interruption_ends_with_the_same_adapter(config_file, tmp_path, resume_from):
    settings = dict(train={"max_steps": 6, "save_steps": 2}, lora={"dropout": 0.1})
    straight = load_config(config_file(**settings, output_dir=str(tmp_path / "straight")))
    expected = train.run(straight)

    broken = load_config(config_file(**settings, output_dir=str(tmp_path / "broken")))
    with pytest.raises(KeyboardInterrupt):
        train.run(broken, callbacks=(Interrupt(4),))
    assert not (Path(broken.output_dir) / "adapter_model.safetensors").exists()
    resume = "latest" if resume_from == "latest" else str(Path(broken.output_dir) / resume_from)
    resumed = train.run(broken, resume=resume)

    assert resumed.optimizer_steps == expected.optimizer_steps == 6
    want, got = adapter(Path(straight.output_dir)), adapter(Path(broken.output_dir))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    # The log carries over from the checkpoint, and the losses computed after the resume point are the
    # uninterrupted run's.
    assert [step for step, _ in resumed.losses] == [step for step, _ in expected.losses] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in expected.losses], abs=1e-5)


@pytest.mark.slow
def test_an_earlier_run_is_never_clobbered(config_file):
    cfg = load_config(config_file(train={"max_steps": 2}))
    train.run(cfg)
    before = adapter(Path(cfg.output_dir))
    with pytest.raises(RunError, match="output_dir is not empty"):
        train.run(cfg)
    assert all(torch.equal(before[k], v) for k, v in adapter(Path(cfg.output_dir)).items())
    stale = Path(cfg.output_dir) / "stale.txt"
    stale.write_text("from the earlier run")
    train.run(cfg, overwrite=True)
    assert not stale.exists() and (Path(cfg.output_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_needs_a_checkpoint(config_file, tmp_path):
    cfg = load_config(config_file())
    with pytest.raises(RunError, match="nothing to resume"):
        train.run(cfg, resume="latest")
    with pytest.raises(RunError, match="not a training checkpoint"):
        train.run(cfg, resume=str(tmp_path))


@pytest.mark.slow
def test_dry_run_step_count_is_the_trainers_and_nothing_is_written(config_file, capsys):
    cfg = load_config(config_file(train={"epochs": 2, "batch_size": 5, "grad_accum": 2}))
    planned = train.run(cfg, dry_run=True)
    assert not Path(cfg.output_dir).exists()
    assert f"-> {planned.optimizer_steps} optimizer steps" in capsys.readouterr().out
    assert train.run(cfg).optimizer_steps == planned.optimizer_steps  # 12 rows / 5 -> 3 batches -> 2 steps/epoch


@pytest.mark.slow
def test_seed_config_dry_run_prints_the_seed_figures(shared, capsys):
    from roletune.cli import main

    code = main(["train", str(ROOT / "configs" / "huanhuan-qwen2.5-7b.yaml"), "--dry-run",
                 f"model.path={shared}/models/qwen2.5-7b-instruct", f"model.tokenizer={shared}/tokenizers/qwen2.5",
                 f"data.path={shared}/data/huanhuan.json"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable params: 20,185,088 || all params: 7,635,801,600" in out
    assert "examples: 3729 read, 3729 kept" in out
    # Trainer's arithmetic: ceil(3729 / 4) = 933 micro-batches -> ceil(933 / 4) = 234 steps per epoch, x 3.
    assert "-> 702 optimizer steps" in out


@pytest.mark.slow
def test_the_small_model_recipe_plans_on_the_0_5b_architecture(shared, capsys):
    import json

    from roletune.cli import main

    model = shared / "models" / "qwen2.5-0.5b-instruct"
    code = main(["train", str(ROOT / "configs" / "huanhuan-qwen2.5-0.5b.yaml"), "--dry-run", f"model.path={model}",
                 f"model.tokenizer={shared}/tokenizers/qwen2.5", f"data.path={shared}/data/huanhuan.json"])
    out = capsys.readouterr().out
    assert code == 0
    c = json.loads((model / "config.json").read_text())
    kv = c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    shapes = [(c["hidden_size"], c["hidden_size"])] * 2 + [(c["hidden_size"], kv)] * 2 + \
        [(c["hidden_size"], c["intermediate_size"])] * 3  # q, o; k, v; gate, up, down (in + out alike)
    lora = 8 * sum(a + b for a, b in shapes) * c["num_hidden_layers"]
    assert f"trainable params: {lora:,d} ||" in out
    assert "examples: 3629 read" in out and "held out for evaluation: 100 rows" in out  # 3729 - 100


def test_torch_compile_is_off_unless_asked(config_file):
    from roletune.training.trainer import training_arguments

    cpu = torch.device("cpu")
    assert training_arguments(load_config(config_file()), cpu).torch_compile is False
    assert training_arguments(load_config(config_file(train={"compile": True})), cpu).torch_compile is True
    assert training_arguments(load_config(config_file(train={"compile": "layers"})), cpu).torch_compile is False


@pytest.mark.slow
def test_compiled_layers_train_the_same_adapter(short_run, tiny_model):
    """train.compile=layers: each decoder layer compiled (dynamic lengths), the same losses and adapter as
    eager. Dropout off: compiled code draws its dropout masks from another random stream than eager's."""
    from transformers import AutoModelForCausalLM

    from roletune.config import LoraConfig
    from roletune.speed.compiled_layers import compile_decoder_layers
    from roletune.speed.levers import add_lora

    (want, want_log), (got, got_log) = (short_run(name, train={"compile": mode})
                                        for name, mode in (("eager", False), ("layers", "layers")))
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert compile_decoder_layers(add_lora(base, LoraConfig(r=4), checkpointed_layers=1)) == 1  # not the checkpointed


@pytest.mark.slow
def test_cuda_graph_mode_pads_packed_batches_and_trains_the_same_adapter(short_run, monkeypatch, tmp_path):
    """train.compile_mode=reduce-overhead: each packed micro-batch is padded to a multiple of 64 tokens (the CPU
    skips the graphs themselves), and the run trains the eager run's adapter on the same count of real tokens."""
    from torch._dynamo.utils import counters

    from roletune.training import trainer

    lengths = []

    def spy(inputs, multiple, pad_id):
        padded = pad_pack(inputs, multiple, pad_id)
        lengths.append((inputs["input_ids"].shape[1], padded["input_ids"].shape[1]))
        return padded
    pad_pack = trainer.pad_packed
    monkeypatch.setattr(trainer, "pad_packed", spy)
    # Sample answers before training and after each epoch, and the held-out loss, run eagerly: nothing is
    # compiled (or recorded) for them.
    evaluated = {"data": {"eval_size": 2}, "eval": {"samples": 1, "max_new_tokens": 3, "steps": 2}}
    want, want_log = short_run("eager", **evaluated)
    torch._dynamo.reset()
    counters.clear()
    got, got_log = short_run("graphs", train={"compile": "layers", "compile_mode": "reduce-overhead"}, **evaluated)
    assert counters["stats"]["unique_graphs"] == 1  # one code for every layer and length
    assert len(lengths) == 4 and all(n < padded and padded % 64 == 0 for n, padded in lengths), lengths
    assert got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        assert_close_at_scale(got[name], want[name], 1e-4, name)
    seen = [json.loads((tmp_path / name / "trainer_state.json").read_text())["num_input_tokens_seen"]
            for name in ("eager", "graphs")]
    assert seen[0] == seen[1] == sum(n for n, _ in lengths)


@pytest.mark.slow
def test_compiled_layers_share_their_code(config_file, monkeypatch):
    """With every lever on (each replaces some module's forward), train.compile=layers compiles one code for
    four layers and two lengths. A forward set per instance made torch.compile compile each layer on its own,
    and past its recompile limit (8, a 7B model has 28) run the rest eagerly; and the first layer, whose input
    is the frozen embeddings' output, took a code of its own until that output was marked as needing a
    gradient."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    monkeypatch.setattr(train, "load_base_model", lambda model_cfg, where, dtype: AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation="sdpa"))
    cfg = load_config(config_file(train={"compile": "layers"}, lora={"dropout": 0.1}))
    model = train.build_model(cfg, torch.device("cpu"), echo=lambda *_: None).train()
    torch._dynamo.reset()
    counters.clear()
    for length in (7, 11):
        ids = torch.randint(0, 512, (1, length))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Nothing in the graph keeps torch.compile from caching it for the next run (roletune's autograd
    # Functions, such as the lean norm and MLP, are left out under compile).
    assert counters["aot_autograd"]["total"] and not counters["aot_autograd"]["autograd_cache_bypass"]


def test_a_data_file_with_one_empty_prompt_record_trains_and_says_so(config_file, persona_rows, capsys, caplog):
    rows = [*persona_rows[:6], {"instruction": "", "input": "", "output": "（林小满先开口）风来了。"}, *persona_rows[6:]]
    cfg = load_config(config_file(rows, train={"max_steps": 2}))
    assert train.run(cfg).optimizer_steps == 2
    assert "records: 1 left out with an empty prompt" in capsys.readouterr().out
    assert "left out 1 record(s) with an empty prompt (instruction and input both empty): record 6" in caplog.text


def test_a_run_folder_holds_no_pickle_one_tokenizer_copy_for_its_checkpoints_and_umask_permissions(config_file):
    import os

    cfg = load_config(config_file(train={"max_steps": 6, "save_steps": 2, "save_total_limit": 2}))
    train.run(cfg, echo=lambda *_: None)
    out = Path(cfg.output_dir)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for folder in (out, out / "checkpoint-6"):
        assert json.loads((folder / checkpoints.TRAINING_ARGS_JSON).read_text())["max_steps"] == 6
    # checkpoint-2, which the tokenizer was first written into, was rotated away: its files live on in the links
    four, six = (os.stat(out / name / "tokenizer.json") for name in ("checkpoint-4", "checkpoint-6"))
    assert four.st_ino == six.st_ino and six.st_nlink == 2
    assert checkpoints.problem(str(out / "checkpoint-6")) is None
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "adapter_model.safetensors", out / "roletune.yaml", out / "checkpoint-6" / "roletune.yaml",
                 out / "checkpoint-6" / "adapter_model.safetensors", out / "loss.png", out / "README.md"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
