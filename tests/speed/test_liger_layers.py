"""Liger-Kernel's layer kernels (train.liger_kernels): which are used and on what evidence, and that a model
using them computes and trains what it did. Triton runs on GPUs only, so here stand-ins with Liger's
signatures (computing what PyTorch does, or deliberately not) take the kernels' place, and the CPU counts
as a GPU."""
import collections

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen2 import modeling_qwen2

from roletune.speed import liger_layers
from roletune.speed.lean_activations import LeanRMSNorm, LeanSiLUMul, make_lean

PLAIN_ROPE = modeling_qwen2.apply_rotary_pos_emb


@pytest.fixture
def stand_ins(monkeypatch):
    """Liger's functions as PyTorch computes them, counting their calls; the CPU taken for a GPU."""
    calls = collections.Counter()

    def rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True):
        calls["RMSNorm"] += 1
        assert (offset, casting_mode, in_place) == (0.0, "llama", False)  # transformers' norm, gradients kept apart
        return LeanRMSNorm.apply(x, weight, eps)

    def swiglu(gate, up):
        calls["SwiGLU"] += 1
        return LeanSiLUMul.apply(gate, up)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["RoPE"] += 1
        return PLAIN_ROPE(q, k, cos, sin)

    kernels = {"RMSNorm": rms_norm, "SwiGLU": swiglu, "RoPE": rope}
    monkeypatch.setattr(liger_layers, "DEVICES", {"cpu"})
    monkeypatch.setattr(liger_layers, "installed", lambda: True)
    monkeypatch.setattr(liger_layers, "load", lambda: dict(kernels))
    yield kernels, calls
    liger_layers.restore()
    liger_layers._KERNELS.clear()


def tiny(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def loss_and_grads(model):
    """A packed row of two examples, forward and backward: the loss and every weight's gradient."""
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (1, 23))
    positions = torch.cat([torch.arange(10), torch.arange(13)])[None]
    loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def test_kernels_that_agree_are_used_and_the_model_computes_the_same(tiny_model, stand_ins):
    _, calls = stand_ins
    reference = tiny(tiny_model)
    make_lean(reference)  # what a run uses where Liger's kernels are not
    want_loss, want_grads = loss_and_grads(reference)

    model = tiny(tiny_model)
    line = liger_layers.use_kernels(model, "auto", compiled=False)
    assert line == "layer kernels: Liger-Kernel's RMSNorm, SwiGLU and RoPE"
    assert make_lean(model) == 0  # nothing left for the lean modules
    assert {"LigerQwen2RMSNorm", "LigerQwen2MLP"} <= kinds(model) and "Qwen2RMSNorm" not in kinds(model)
    assert modeling_qwen2.apply_rotary_pos_emb is not PLAIN_ROPE
    calls.clear()  # the probe's own calls
    got_loss, got_grads = loss_and_grads(model)
    layers = model.config.num_hidden_layers
    assert calls == {"RMSNorm": 2 * layers + 1, "SwiGLU": layers, "RoPE": layers}
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("wrong", [lambda x: 2 * x, lambda x: x + float("nan")], ids=["doubled", "nan"])
def test_a_kernel_that_differs_or_fails_is_left_out_and_said_why(tiny_model, stand_ins, wrong):
    kernels, _ = stand_ins
    rms_norm = kernels["RMSNorm"]
    kernels["RMSNorm"] = lambda *args: wrong(rms_norm(*args))

    def no_kernel(gate, up):
        raise RuntimeError("no kernel image is available for execution on the device\nmore detail")

    kernels["SwiGLU"] = no_kernel
    model = tiny(tiny_model)
    line = liger_layers.use_kernels(model, "auto", compiled=False)
    assert line.startswith("layer kernels: Liger-Kernel's RoPE; PyTorch's for the rest (RMSNorm differs from "
                           "PyTorch's by ")
    assert line.endswith("; SwiGLU failed: RuntimeError: no kernel image is available for execution on the device)")
    assert not any(kind.startswith("Liger") for kind in kinds(model))
    assert make_lean(model) == 2 * model.config.num_hidden_layers + 1 + model.config.num_hidden_layers
    assert modeling_qwen2.apply_rotary_pos_emb is not PLAIN_ROPE


def test_none_is_used_off_a_gpu_without_liger_under_compile_or_when_off(tiny_model, stand_ins, monkeypatch):
    model = tiny(tiny_model)
    before = kinds(model)
    assert liger_layers.use_kernels(model, "auto", compiled="layers") == (
        "layer kernels: PyTorch's (torch.compile traces them; Liger-Kernel's are left out with train.compile)")

    for error in (ImportError("No module named 'triton'"), RuntimeError("Triton 3.6 needs torch 2.11\nmore")):
        def broken(error=error):
            raise error

        monkeypatch.setattr(liger_layers, "load", broken)
        assert liger_layers.use_kernels(model, "auto", compiled=False) == (
            f"layer kernels: PyTorch's, not Liger-Kernel's ({type(error).__name__}: {str(error).splitlines()[0]})")
    monkeypatch.setattr(liger_layers, "installed", lambda: False)
    assert liger_layers.use_kernels(model, "auto", compiled=False) is None
    monkeypatch.setattr(liger_layers, "installed", lambda: True)
    monkeypatch.setattr(liger_layers, "DEVICES", {"cuda"})
    assert liger_layers.use_kernels(model, "auto", compiled=False) is None  # the CPU again
    assert kinds(model) == before and modeling_qwen2.apply_rotary_pos_emb is PLAIN_ROPE


def test_false_or_a_refused_rope_after_auto_gives_transformers_its_rope_back(tiny_model, stand_ins):
    kernels, _ = stand_ins
    liger_layers.use_kernels(tiny(tiny_model), "auto", compiled=False)
    assert modeling_qwen2.apply_rotary_pos_emb is not PLAIN_ROPE
    assert liger_layers.use_kernels(tiny(tiny_model), False, compiled=False) is None
    assert modeling_qwen2.apply_rotary_pos_emb is PLAIN_ROPE
    liger_layers.use_kernels(tiny(tiny_model), "auto", compiled=False)
    rope = kernels["RoPE"]
    kernels["RoPE"] = lambda q, k, cos, sin: tuple(2 * t for t in rope(q, k, cos, sin))
    line = liger_layers.use_kernels(tiny(tiny_model), "auto", compiled=False)  # a model the kernel fails for
    assert "RoPE differs" in line and modeling_qwen2.apply_rotary_pos_emb is PLAIN_ROPE


def test_routed_rope_sends_other_devices_and_calls_to_transformers_own(tiny_model, stand_ins, monkeypatch):
    _, calls = stand_ins
    liger_layers.use_kernels(tiny(tiny_model), "auto", compiled=False)
    q, k = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16)
    cos, sin = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    routed = modeling_qwen2.apply_rotary_pos_emb
    calls.clear()
    routed(q, k, cos, sin)
    assert calls["RoPE"] == 1
    got = routed(q, k, cos[:, :, None], sin[:, :, None], unsqueeze_dim=2)  # a call it was not written for
    want = PLAIN_ROPE(q, k, cos[:, :, None], sin[:, :, None], unsqueeze_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    monkeypatch.setattr(liger_layers, "DEVICES", {"cuda"})  # tensors on a device Triton does not run on
    got, want = routed(q, k, cos, sin), PLAIN_ROPE(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert calls["RoPE"] == 1  # neither went to the kernel


@pytest.mark.slow
def test_a_run_with_the_kernels_trains_the_same_adapter(short_run, stand_ins):
    _, calls = stand_ins
    want, want_log = short_run("torch", lora={"dropout": 0.1}, train={"liger_kernels": False})
    assert not calls
    got, got_log = short_run("liger", lora={"dropout": 0.1}, train={"liger_kernels": "auto"})
    assert calls["RMSNorm"] and calls["SwiGLU"] and calls["RoPE"]
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_with_none_of_the_known_modules_is_left_alone(stand_ins):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, calls = stand_ins
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    before = kinds(model)
    assert liger_layers.use_kernels(model, "auto", compiled=False) is None
    assert kinds(model) == before and not calls and modeling_qwen2.apply_rotary_pos_emb is PLAIN_ROPE


def test_the_real_package_loads_and_kernels_that_cannot_run_here_are_left_out(tiny_model, monkeypatch):
    pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel (with Triton) is not installed")
    assert set(liger_layers.load()) == {"RMSNorm", "SwiGLU", "RoPE"}  # its public functions, where roletune calls them
    monkeypatch.setattr(liger_layers, "DEVICES", {"cpu"})  # Triton has no CPU driver: every kernel fails here
    model = tiny(tiny_model)
    before = kinds(model)
    line = liger_layers.use_kernels(model, "auto", compiled=False)
    assert line.startswith("layer kernels: PyTorch's, not Liger-Kernel's (RMSNorm failed: ")
    assert "; SwiGLU failed: " in line and "; RoPE failed: " in line
    assert kinds(model) == before and modeling_qwen2.apply_rotary_pos_emb is PLAIN_ROPE
