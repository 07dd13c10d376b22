import pytest
import torch

from roletune.config import ModelConfig, config_from_dict
from roletune.errors import ConfigError
from roletune.model import apply_lora, build_meta_model, resolve_device, resolve_dtype

SEED_LORA = {"r": 8, "alpha": 32, "dropout": 0.1}


def test_cpu_and_auto_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


def test_a_gpu_that_is_not_there_is_a_clear_error():
    index = torch.cuda.device_count() if torch.cuda.is_available() else 3
    with pytest.raises(ConfigError, match=rf"model.device=cuda:{index}: .*(visible|CUDA_VISIBLE_DEVICES)"):
        resolve_device(f"cuda:{index}")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu7")


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("name, trainable, total", [
    ("qwen2.5-7b-instruct", 20_185_088, 7_635_801_600),
    ("qwen2.5-0.5b-instruct", 4_399_104, 498_431_872),
])
def test_seed_lora_parameter_counts_on_the_meta_device(shared, name, trainable, total):
    cfg = config_from_dict({"model": {"path": str(shared / "models" / name)}, "data": {"path": "x"},
                            "lora": SEED_LORA})
    model = apply_lora(build_meta_model(cfg.model), cfg.lora)
    assert model.get_nb_trainable_parameters() == (trainable, total)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_lora_targets_are_a_config_error(tiny_model):
    cfg = config_from_dict({"model": {"path": str(tiny_model)}, "data": {"path": "x"},
                            "lora": {"target_modules": ["nonexistent_proj"]}})
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(build_meta_model(ModelConfig(path=str(tiny_model))), cfg.lora)


def test_modelscope_without_the_package_says_what_to_install(monkeypatch):
    import importlib.util

    from roletune.model import resolve_source

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelscope" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install modelscope"):
        resolve_source("modelscope:Qwen/Qwen2.5-7B-Instruct")
    assert resolve_source("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
