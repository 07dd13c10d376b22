"""Shared fixtures: the real Qwen2.5 tokenizer from ../shared, the tiny demo model, config files, trained runs
and servers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SEED_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def assert_close_at_scale(got, want, tolerance: float, msg: str) -> None:
    """got equals want within `tolerance` of want's largest element. Float sums taken in another order (chunked
    logits, compiled code, another CPU's kernels) move the elements near zero by more than any bound of their own,
    while a wrong gradient is off by the order of the tensor itself."""
    import torch

    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item(), msg=msg)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "tokenizers" / "qwen2.5").is_dir():
        pytest.skip("../shared (real Qwen2.5 tokenizer and data) is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def qwen_tokenizer(shared):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2.5")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The demo's tiny Qwen2 (random weights, real Qwen2.5 tokenizer), built once into .cache."""
    from roletune.demo.model import build_tiny_model

    return build_tiny_model(ROOT / ".cache" / "demo-model")


@pytest.fixture
def write_json(tmp_path):
    def write(records, name="data.json", jsonl=False) -> Path:
        path = tmp_path / name
        if jsonl:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        else:
            path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        return path
    return write


@pytest.fixture
def persona_rows():
    """Twelve short original pairs: enough for a few optimizer steps on the tiny model."""
    return [{"instruction": f"第{i}个问题：今天海上风大吗？", "input": "", "output": f"风有{i}级，灯塔照常亮着。"}
            for i in range(12)]


@pytest.fixture
def config_file(tmp_path, tiny_model, write_json, persona_rows):
    """A small training config on the tiny model; keyword arguments replace whole sections."""
    def make(records=None, **sections) -> Path:
        data_path = write_json(records if records is not None else persona_rows, "train.json")
        raw = {
            "model": {"path": str(tiny_model), "device": "cpu"},
            "data": {"path": str(data_path), "system_prompt": "你是守灯人林小满。", "max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "lr": 5.0e-3, "batch_size": 4, "grad_accum": 1, "logging_steps": 1, "report_to": "none",
                      "save_steps": 2, "seed": 7},
            "output_dir": str(tmp_path / "run"),
        }
        for name, value in sections.items():
            if isinstance(value, dict):
                raw.setdefault(name, {}).update(value)
            else:
                raw[name] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        return path
    return make


_shared_runs: dict = {}  # short_run(shared=True): the resolved config -> what its run returned


@pytest.fixture
def short_run(config_file, tmp_path):
    """Train the tiny model for 4 steps at a high learning rate; keyword arguments update config sections.
    Returns the adapter's tensors and the logged (loss, grad_norm) of every step, flattened.
    shared=True: a baseline several A/B tests compare against, trained once per test session for each
    resolved config (only for calls that patch nothing, whose result the config alone decides)."""
    import dataclasses

    from safetensors.torch import load_file

    from roletune import train
    from roletune.config import dump_config, load_config

    def run(name: str, shared: bool = False, **sections):
        sections["train"] = {"max_steps": 4, "lr": 1e-2, **sections.get("train", {})}
        cfg = load_config(config_file(output_dir=str(tmp_path / name), **sections))
        key = dump_config(dataclasses.replace(cfg, output_dir="", data=dataclasses.replace(cfg.data, path=""))) \
            if shared else None
        if shared and key in _shared_runs:
            return _shared_runs[key]
        train.run(cfg, echo=lambda *_: None)
        out = Path(cfg.output_dir)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        result = load_file(out / "adapter_model.safetensors"), [v for e in history if "loss" in e
                                                                for v in (e["loss"], e["grad_norm"])]
        if shared:
            _shared_runs[key] = result
        return result
    return run


@pytest.fixture
def saved_bytes():
    """Bytes autograd keeps for backward while `forward()` runs: each storage once, `model`'s weights excluded."""
    import torch

    def measure(model, forward) -> int:
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
        return sum(kept.values())
    return measure


LIGHTHOUSE_SYSTEM = "你是守灯人林小满。"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A tiny-model run trained until it answers the pattern and stops at <|im_end|> (~10 s)."""
    return train_lighthouse(tmp_path_factory.mktemp("trained"), tiny_model)


def train_lighthouse(folder: Path, base: Path, **settings) -> Path:
    """A run of `base` on the lighthouse rows, in folder/run; `settings` add config sections (eval: ...)."""
    from roletune import train
    from roletune.config import config_from_dict

    rows = [{"instruction": f"第{i}个问题：今天海上风大吗？", "input": "", "output": f"风有{i}级，灯塔照常亮着。"}
            for i in range(12)]
    data = folder / "rows.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = config_from_dict({
        "model": {"path": str(base), "device": "cpu"},
        "data": {"path": str(data), "system_prompt": LIGHTHOUSE_SYSTEM, "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 30, "lr": 2.0e-2, "batch_size": 6, "grad_accum": 1, "logging_steps": 10, "report_to": "none",
                  "save_steps": 1000, "seed": 7},
        "output_dir": str(folder / "run"), **settings})
    train.run(cfg, echo=lambda *_: None)
    return Path(cfg.output_dir)


@pytest.fixture(scope="session")
def small_lora_model(tiny_model):
    """Build the tiny model in fp32 with LoRA r=4 whose B is non-zero, so A gets gradients too."""
    import torch
    from transformers import AutoModelForCausalLM

    from roletune.config import LoraConfig
    from roletune.speed.levers import add_lora

    def build(**load_kwargs):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa",
                                                    **load_kwargs)
        model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        return model
    return build


@pytest.fixture(scope="session")
def reply_features(tiny_model):
    """(tokenizer, features) of four short conversations of uneven lengths."""
    from transformers import AutoTokenizer

    from roletune.data import Message
    from roletune.data.tokenize import tokenize_all

    replies = ["好。", "风有三级，灯塔照常亮着。", "今晚有雾，船都回港了，你也早点歇着吧。", "嗯"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    conversations = [[Message("system", "你是守灯人。"), Message("user", f"问题{i}" * (i + 1)),
                      Message("assistant", reply)] for i, reply in enumerate(replies)]
    examples, _ = tokenize_all(conversations, tokenizer, 128, "assistant")
    return tokenizer, [e.as_features() for e in examples]


@pytest.fixture(scope="session")
def device_waits():
    """A dispatch mode recording the operators that make the host wait for a GPU (their result's size or
    value must be read back), each with the file that called it and whether that is roletune's own code.
    On the CPU nothing waits, but the same operators run: the record says what a GPU run would wait on."""
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class DeviceWaits(TorchDispatchMode):
        WAITS = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "unique", "_unique2"}

        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func.overloadpacket.__name__ == "index" and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if func.overloadpacket.__name__ in self.WAITS or bool_index:
                stack = traceback.extract_stack()[:-1]
                if any("/torch/utils/data/" in frame.filename for frame in stack):
                    return func(*args, **(kwargs or {}))  # a batch being built, on the host
                caller = next(frame for frame in reversed(stack) if "/torch/" not in frame.filename)
                ours = "/src/roletune/" in caller.filename
                where = caller.filename.split("/src/")[-1].split("site-packages/")[-1]  # roletune/training/stopping.py
                self.calls.append((func.overloadpacket.__name__, ours, where))
            return func(*args, **(kwargs or {}))

    return DeviceWaits


# --- real `roletune serve` processes on 127.0.0.1, started once per test session (tests/serve) ---

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def requests_heard(url: str) -> int:
    """How many requests a `roletune serve` at `url` has answered."""
    with urllib.request.urlopen(f"{url}/health") as response:
        return json.loads(response.read())["requests"]


@pytest.fixture(scope="session")
def start_server():
    children = []

    def start(*args, env=None):
        port = free_port()
        child = subprocess.Popen([sys.executable, "-m", "roletune", "serve", *args, "--port", str(port),
                                  "--device", "cpu"], env={**os.environ, **(env or {})},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children.append(child)
        deadline = time.time() + 180
        while True:
            assert child.poll() is None, child.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    return f"http://127.0.0.1:{port}"
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
    yield start
    for child in children:
        child.terminate()
        child.wait(timeout=30)


@pytest.fixture(scope="session")
def server(start_server, trained_run):
    return start_server(str(trained_run), f"keeper={trained_run}")


@pytest.fixture(scope="session")
def key_server(start_server, trained_run):
    """A server that wants an API key (`.key`) and lets web pages from `.origin` call it."""
    key, origin = "sk-test-roletune", "http://localhost:3000"
    url = start_server(str(trained_run), "--allow-origin", origin, env={"ROLETUNE_API_KEY": key})
    return SimpleNamespace(url=url, key=key, origin=origin)
