"""Safe defaults: no remote code unless asked (and then a warning naming the repository), safetensors
only unless pickle is allowed, and nothing uploaded unless an uploading tracker was chosen."""
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from roletune.config import ModelConfig, config_from_dict
from roletune.errors import ModelError
from roletune.model import apply_lora, load_adapter, load_base_model, load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def pickle_model(tiny_model, tmp_path):
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_remote_code_is_off_by_default_and_a_warning_names_the_repository(tiny_model, caplog, monkeypatch):
    import roletune.model

    monkeypatch.setattr(roletune.model, "_warned_remote_code", set())  # warned once per location per process
    assert ModelConfig().trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        load_tokenizer(ModelConfig(path=str(tiny_model)))
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_tokenizer(ModelConfig(path=str(tiny_model), trust_remote_code=True))
        load_base_model(ModelConfig(path=str(tiny_model), trust_remote_code=True), CPU, torch.float32)
    warnings = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert warnings == [f"model.trust_remote_code is on: Python code from {tiny_model} will run on this machine"]


def test_pickle_weights_are_refused_unless_allowed(pickle_model):
    assert ModelConfig().allow_pickle is False
    with pytest.raises(ModelError) as caught:
        load_base_model(ModelConfig(path=str(pickle_model)), CPU, torch.float32)
    message = str(caught.value)
    assert message.startswith(f"{pickle_model}: cannot load the model (") and "\n" not in message
    assert "set model.allow_pickle=true" in message
    model = load_base_model(ModelConfig(path=str(pickle_model), allow_pickle=True), CPU, torch.float32)
    assert model.config.model_type == "qwen2"


def test_pickle_adapters_are_refused_unless_allowed(tiny_model, tmp_path):
    lora = config_from_dict({"model": {"path": str(tiny_model)}, "data": {"path": "x"}, "lora": {"r": 2}}).lora
    trained = apply_lora(load_base_model(ModelConfig(path=str(tiny_model)), CPU, torch.float32), lora)
    trained.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    base = load_base_model(ModelConfig(path=str(tiny_model)), CPU, torch.float32)
    with pytest.raises(ModelError, match=r"adapter_model.bin.*set model.allow_pickle=true"):
        load_adapter(base, str(tmp_path / "adapter"))
    assert load_adapter(base, str(tmp_path / "adapter"), allow_pickle=True).peft_config["default"].r == 2


def test_trainer_never_pushes_to_the_hub(config_file):
    from roletune.config import load_config
    from roletune.training.trainer import training_arguments

    args = training_arguments(load_config(config_file()), CPU)
    assert args.push_to_hub is False and args.hub_model_id is None
    assert args.report_to in ([], ["none"], "none")  # only roletune's own tracker, chosen by train.report_to


@pytest.mark.parametrize("logged_in, mode", [(False, "local"), (True, "online")])
def test_swanlab_goes_online_only_when_logged_in(config_file, tmp_path, monkeypatch, logged_in, mode):
    from types import SimpleNamespace

    import swanlab

    from roletune.config import load_config
    from roletune.training.track import SwanLabTracker

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    if logged_in:
        monkeypatch.setenv("SWANLAB_API_KEY", "test-key")
    started = {}
    monkeypatch.setattr(swanlab, "init", lambda **kwargs: started.update(kwargs) or SimpleNamespace(id="r1"))
    tracker = SwanLabTracker(load_config(config_file(train={"report_to": "swanlab"})))
    assert started["mode"] == mode
    assert ("cloud" in tracker.where) == logged_in
