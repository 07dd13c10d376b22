"""Lean RMSNorm and SwiGLU: the outputs of transformers' modules bit for bit, their gradients, the same
training run, and less kept for backward, by exactly what the memory estimate says."""
import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F

from roletune.config import LoraConfig
from roletune.speed.lean_activations import MLPS, NORMS, LeanRMSNorm, LeanSiLUMul, make_lean
from roletune.training import memory


def qwen2_norm(hidden: int, requires_grad: bool, dtype: torch.dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(requires_grad)
    return norm


def grads_of(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("weight_trained", [False, True])
def test_rms_norm_matches_transformers(dtype, tolerance, weight_trained):
    torch.manual_seed(0)
    norm = qwen2_norm(64, weight_trained, dtype)
    x = (torch.randn(3, 7, 64) * 3).to(dtype).requires_grad_()
    want, want_grads = grads_of(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), x, norm.weight)
    got, got_grads = grads_of(lambda x, w: LeanRMSNorm.apply(x, w, norm.variance_epsilon), x, norm.weight)
    assert torch.equal(got, want)  # the same operations in the same order
    assert len(got_grads) == len(want_grads) == 1 + weight_trained
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_autograd_exactly(dtype):
    torch.manual_seed(0)
    gate, up = ((torch.randn(5, 96) * 4).to(dtype).requires_grad_() for _ in range(2))
    want, want_grads = grads_of(lambda g, u: F.silu(g) * u, gate, up)
    got, got_grads = grads_of(LeanSiLUMul.apply, gate, up)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


def test_only_modules_with_the_known_forward_are_replaced():
    """NORMS and MLPS name transformers classes whose forward is the one roletune's lean version
    computes; a transformers release that changes one of them fails here instead of training differently."""
    import importlib

    def source(name):
        family = name.removesuffix("RMSNorm").removesuffix("MLP").lower()
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        code = textwrap.dedent(inspect.getsource(getattr(module, name).forward))
        return code.replace("self.act_fn(", "ACT(")

    for group in (NORMS, MLPS):
        assert len({source(name) for name in group}) == 1, group


@pytest.mark.slow
def test_a_lean_run_trains_the_same_adapter(short_run):
    want, want_log = short_run("plain", lora={"dropout": 0.1}, train={"lean_activations": False})
    got, got_log = short_run("lean", shared=True, lora={"dropout": 0.1})  # on by default
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lean_layers_keep_what_the_estimate_says(saved_bytes):
    """Bytes autograd keeps in a forward of a small Qwen2 + LoRA under bf16 autocast (as Trainer runs on a
    GPU), with and without the lean modules: the difference is the estimate's, to the byte."""
    import peft
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    lora = LoraConfig(r=8, dropout=0.0)

    def kept_bytes(lean: bool) -> int:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        if lean:
            assert make_lean(base) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, an MLP per layer
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=lora.target_modules))
        # Embeddings that require grad, as gradient checkpointing makes them: else the first norm keeps nothing.
        embeds = base.get_input_embeddings()(torch.randint(0, config.vocab_size, (1, 150))).requires_grad_()

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.base_model.model.model(inputs_embeds=embeds, use_cache=False)
        return saved_bytes(model, forward)

    plain, lean = kept_bytes(False), kept_bytes(True)
    estimated = [memory.estimate(config, lora, torch.bfloat16, 150, 0, 0, lean=flag).kept_activations
                 for flag in (False, True)]
    assert plain - lean == estimated[0] - estimated[1] > 0
    assert lean / plain < 0.85
