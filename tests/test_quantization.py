"""QLoRA: a bitsandbytes-quantised base trains, answers, and merges into the unquantised base."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from roletune import decoding, train
from roletune.config import config_from_dict, load_config
from roletune.errors import ConfigError
from roletune.merge import merge, probe_inputs

QUANTISED_LINEAR = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def base_layer(model, name="q_proj"):
    """The layer LoRA wraps in the first decoder layer, through PeftModel's wrappers."""
    layer = model.get_base_model().model.layers[0]
    module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
    return module.base_layer


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantised_base_gets_fp32_adapters_on_bnb_layers(config_file, quantization):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = load_config(config_file(model={"quantization": quantization}))
    model = train.build_model(cfg, torch.device("cpu"), echo=lambda *_: None)
    for name in ["q_proj", "down_proj"]:
        assert type(base_layer(model, name)) is getattr(bnb.nn, QUANTISED_LINEAR[quantization])
    if quantization == "4bit":
        state = base_layer(model).weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 with double quantisation
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_bf16_adapters_on_a_quantised_base(config_file, quantization):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(config_file(model={"quantization": quantization, "dtype": "bf16"}, lora={"dtype": "bf16"}))
    model = train.build_model(cfg, torch.device("cpu"), echo=lambda *_: None)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("dtype, kept", [("fp16", torch.float32), ("bf16", torch.bfloat16)])
def test_only_an_fp16_quantised_base_gets_fp32_norms_and_embeddings(tiny_model, dtype, kept):
    """peft's k-bit preparation guards fp16 against overflow; in bf16 it would only cost memory."""
    pytest.importorskip("bitsandbytes")
    from roletune.model import DTYPES, load_base_model
    from roletune.speed.levers import add_lora

    cfg = config_from_dict({"model": {"path": str(tiny_model), "quantization": "4bit", "dtype": dtype},
                            "data": {"path": "x"}})
    model = add_lora(load_base_model(cfg.model, torch.device("cpu"), DTYPES[dtype]), cfg.lora)
    assert model.get_input_embeddings().weight.dtype == kept
    assert model.get_base_model().model.norm.weight.dtype == kept
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def stored_bytes(model) -> int:
    """Every tensor the model holds: parameters (quantised codes included) and bitsandbytes' quantisation
    state (absmax, its own absmax and code tables), each counted once."""
    tensors = {id(t): t for t in model.parameters()}
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        for value in (state.as_dict() if state is not None else {}).values():
            if torch.is_tensor(value):
                tensors[id(value)] = value
        scale = getattr(param, "SCB", None)  # LLM.int8's per-row scale
        if scale is not None:
            tensors[id(scale)] = scale
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_memory_estimate_counts_the_quantised_weights_as_loaded(tmp_path, quantization):
    """memory.weight_bytes against the bytes a checkpoint takes once from_pretrained has quantised it, on a
    model whose decoder Linears outweigh its embeddings (as a 7B model's do)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig

    from roletune.model import DTYPES, load_base_model
    from roletune.training import memory

    config = AutoConfig.for_model("qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    cfg = config_from_dict({"model": {"path": str(tmp_path), "quantization": quantization, "dtype": "bf16"},
                            "data": {"path": "x"}})
    model = load_base_model(cfg.model, torch.device("cpu"), DTYPES["bf16"])
    estimated = memory.weight_bytes(memory.Shape.of(config), 2, None if quantization == "none" else quantization)
    # Within 1.5%: what is left is bitsandbytes' small per-layer tables and LLM.int8's per-row scales.
    assert stored_bytes(model) == pytest.approx(estimated, rel=0.015)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model):
    """A few QLoRA steps on the tiny model with a 4-bit base (~10 s)."""
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("qlora")
    data = folder / "rows.json"
    rows = [{"instruction": f"第{i}个问题：今天海上风大吗？", "input": "", "output": f"风有{i}级，灯塔照常亮着。"}
            for i in range(12)]  # conftest's persona_rows, which is per test
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = config_from_dict({
        "model": {"path": str(tiny_model), "device": "cpu", "quantization": "4bit"},
        "data": {"path": str(data), "system_prompt": "你是守灯人林小满。", "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "lr": 5.0e-3, "batch_size": 4, "grad_accum": 1, "logging_steps": 1,
                  "report_to": "none", "save_steps": 100, "seed": 7},
        "output_dir": str(folder / "run")})
    return cfg, train.run(cfg, echo=lambda *_: None)


def assert_loss_falls(result):
    losses = [loss for _, loss in result.losses]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses


def assert_answers(run: Path, quantization: str):
    """chat / compare load the base as training did: quantised, with the adapter on top."""
    session = decoding.load_session(str(run), device="cpu")
    assert type(base_layer(session.model)).__name__ == QUANTISED_LINEAR[quantization]
    config = decoding.decoding_config(session, greedy=True, max_new_tokens=6)
    (reply,) = decoding.answer_batch(session, [[{"role": "user", "content": "今天海上风大吗？"}]], config)
    assert reply.tokens > 0


@pytest.mark.slow
def test_qlora_4bit_trains_and_its_adapter_answers(qlora_run):
    cfg, result = qlora_run
    assert_loss_falls(result)
    assert_answers(Path(cfg.output_dir), "4bit")


@pytest.mark.slow
def test_qlora_8bit_trains_and_its_adapter_answers(config_file):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(config_file(model={"quantization": "8bit"}, train={"max_steps": 6, "save_steps": 100}))
    assert_loss_falls(train.run(cfg, echo=lambda *_: None))
    assert_answers(Path(cfg.output_dir), "8bit")


@pytest.mark.slow
def test_merge_folds_a_qlora_adapter_into_the_unquantised_base(qlora_run, tmp_path, tiny_model):
    cfg, _ = qlora_run
    run = Path(cfg.output_dir)
    out = merge(str(run), str(tmp_path / "merged"), dtype="fp32", device="cpu", echo=lambda *_: None)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "roletune_merge.json").read_text())["trained_quantization"] == "4bit"

    # plain fp32 weights that equal W + scale * B @ A of the full-precision base
    merged_weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in merged_weights.values())
    adapter = load_file(run / "adapter_model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(merged_weights[f"{name}.weight"],
                               base[f"{name}.weight"] + (cfg.lora.alpha / cfg.lora.r) * b @ a, rtol=0, atol=1e-6)
    assert not torch.equal(merged_weights[f"{name}.weight"], base[f"{name}.weight"])

    # and it answers like the adapter on the unquantised base
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    unquantised = decoding.load_session(str(run), device="cpu", dtype="fp32", quantization="none")
    inputs = probe_inputs(unquantised)
    with torch.inference_mode():
        want, got = unquantised.model(**inputs).logits, merged(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (want - got).abs()[mask].max().item() < 1e-4


def test_dry_run_plans_a_quantised_run(config_file):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(config_file(model={"quantization": "4bit"}, train={"max_steps": 5}))
    assert train.run(cfg, dry_run=True).optimizer_steps == 5
    assert not Path(cfg.output_dir).exists()


def test_missing_bitsandbytes_is_a_one_line_config_error(config_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = load_config(config_file(model={"quantization": "4bit"}))
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=r"model.quantization=4bit: .*pip install roletune\[qlora\]") as err:
            train.run(cfg, dry_run=dry_run, echo=lambda *_: None)
        assert "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("distributed", ["fsdp", "deepspeed"])
def test_quantised_base_is_refused_with_sharded_training(distributed):
    raw = {"model": {"path": "m", "quantization": "4bit"}, "data": {"path": "d"},
           "train": {"distributed": distributed, "deepspeed": "ds.json" if distributed == "deepspeed" else None}}
    with pytest.raises(ConfigError, match=f"model.quantization=4bit with train.distributed={distributed}"):
        config_from_dict(raw)
