import os

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


def lora_model(tiny_model, lora_dtype: str, dropout: float = 0.0):
    """The tiny model loaded in bf16 with LoRA; lora_B drawn at random so the adapter changes the output."""
    from roletune.model import load_base_model
    from roletune.speed.levers import add_lora

    cfg = config_from_dict({"model": {"path": str(tiny_model), "dtype": "bf16"}, "data": {"path": "x"},
                            "lora": {"r": 4, "alpha": 8, "dropout": dropout, "dtype": lora_dtype}})
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model, torch.device("cpu"), torch.bfloat16), cfg.lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_lora_grads(model, autocast: bool):
    """One forward/backward; also the dtype the first LoRA matmul was fed."""
    fed = []
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    hook = q_proj.lora_A["default"].register_forward_pre_hook(lambda module, args: fed.append(args[0].dtype))
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}, fed[0]


@pytest.mark.parametrize("lora_dtype, weights", [("auto", torch.float32), ("fp32", torch.float32),
                                                 ("bf16", torch.bfloat16)])
def test_lora_dtype_sets_the_adapter_weights(tiny_model, lora_dtype, weights):
    model = lora_model(tiny_model, lora_dtype)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {weights}
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("lora_dtype", ["auto", "bf16"])
def test_lora_under_autocast_gets_bf16_inputs_and_the_default_path_gradients(tiny_model, lora_dtype):
    want_loss, want_grads, fed_default = loss_and_lora_grads(lora_model(tiny_model, "fp32"), autocast=True)
    loss, grads, fed = loss_and_lora_grads(lora_model(tiny_model, lora_dtype), autocast=True)
    assert fed_default == torch.float32  # peft's default copies the activations to fp32 ...
    assert fed == torch.bfloat16  # ... the lever feeds them as they are
    assert loss == pytest.approx(want_loss, rel=1e-2)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():  # bf16 keeps 8 bits of mantissa
        scale = want_grads[name].abs().max().item()
        assert scale > 0 and (grad - want_grads[name]).abs().max().item() <= 2e-2 * scale, name


def test_auto_keeps_the_fp32_cast_without_autocast(tiny_model):
    """CPU training runs a bf16 model without autocast: fp32 adapter weights then need fp32 inputs."""
    want_loss, want_grads, _ = loss_and_lora_grads(lora_model(tiny_model, "fp32"), autocast=False)
    loss, grads, fed = loss_and_lora_grads(lora_model(tiny_model, "auto"), autocast=False)
    assert fed == torch.float32 and loss == want_loss
    assert all(torch.equal(grads[n], want_grads[n]) for n in want_grads)


@pytest.mark.slow
@pytest.mark.parametrize("lora_dtype", ["auto", "bf16"])
def test_a_bf16_run_on_cpu_trains_and_its_adapter_answers(config_file, lora_dtype):
    import math

    from roletune import decoding, train
    from roletune.config import load_config

    cfg = load_config(config_file(model={"dtype": "bf16"}, lora={"dtype": lora_dtype},
                                  train={"max_steps": 6, "save_steps": 100}))
    losses = [loss for _, loss in train.run(cfg, echo=lambda *_: None).losses]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    session = decoding.load_session(cfg.output_dir, device="cpu")  # PeftModel.from_pretrained
    config = decoding.decoding_config(session, greedy=True, max_new_tokens=6)
    (reply,) = decoding.answer_batch(session, [[{"role": "user", "content": "今天海上风大吗？"}]], config)
    assert reply.tokens > 0


def test_bf16_adapters_need_a_bf16_base():
    from roletune.model import check_lora_dtype

    cfg = config_from_dict({"model": {"path": "m"}, "data": {"path": "x"}, "lora": {"dtype": "bf16"}})
    check_lora_dtype(cfg.lora, torch.bfloat16)
    with pytest.raises(ConfigError, match="lora.dtype=bf16 needs bf16 base weights, but the base loads in fp32"):
        check_lora_dtype(cfg.lora, resolve_dtype("auto", torch.device("cpu")))


def test_a_folder_without_tokenizer_files_says_so(tiny_model, tmp_path):
    import shutil

    from roletune.errors import ModelError
    from roletune.model import load_tokenizer

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, weights_only / name)
    with pytest.raises(ModelError, match=r"weights: no tokenizer files in this folder \(tokenizer.json, "
                                         r"tokenizer_config.json\); set model.tokenizer"):
        load_tokenizer(ModelConfig(path=str(weights_only)))


@pytest.mark.parametrize("location", ["./models/qwen", "/no/such/model", "~/no/such/model", "models/qwen/7b"])
def test_a_missing_local_folder_is_no_such_folder_never_a_hub_lookup(location):
    from roletune.errors import ModelError
    from roletune.model import resolve_source

    with pytest.raises(ModelError, match=f"^{location}: no such folder$"):
        resolve_source(location)


@pytest.mark.slow
def test_an_unreachable_hub_fails_after_one_request_and_says_how_to_work_offline(tmp_path):
    """HF_ENDPOINT points at a local port that accepts and drops every connection: the command asks once,
    then says in one line how to go on without the hub (transformers' own download retries for most of a
    minute)."""
    import socket
    import subprocess
    import sys
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def drop_every_connection():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            connection.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"))
    try:
        done = subprocess.run([sys.executable, "-m", "roletune", "chat", "someone/no-such-model", "--prompt", "x",
                               "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert "someone/no-such-model: the Hugging Face hub cannot be reached" in err[0]
    assert "not in the local cache; give a local folder" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
    assert 1 <= len(attempts) <= 2  # the hub client asks again once on a dropped connection; transformers: 7 times
