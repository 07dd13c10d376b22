"""varlen attention computes what sdpa computes: within each packed example on a training batch,
with sdpa's masks everywhere else. PyTorch's varlen kernel runs on CUDA only; here the call into it is
checked against stand-ins written from its documented contract, one per signature it has had."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from roletune import train
from roletune.config import load_config
from roletune.speed import attention
from roletune.training.batching import make_collator, reply_token_loss


def reference_attention(query, key, value, cu_seq_q, scale, causal, gqa):
    """The documented result of varlen_attn, written out: softmax(q k^T * scale) v per example."""
    if key.shape[1] != query.shape[1]:
        if not gqa:
            raise ValueError("Expect query and key/value to have the same number of heads")
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_q.tolist()
    out = []
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        scores = q @ k.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(out)


def kernel_with_window_size(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch >= 2.11's signature: causal is window_size=(-1, 0)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return reference_attention(query, key, value, cu_seq_q, scale, tuple(window_size) == (-1, 0), enable_gqa)


def kernel_with_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: is_causal=, no scale (always 1/sqrt(head_dim)), no GQA."""
    return reference_attention(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, is_causal, False)


KERNELS = [kernel_with_window_size, kernel_with_is_causal]


def not_causal(query, key, value, cu_seq_q, *args, **kwargs):
    return reference_attention(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, False, True)


@pytest.fixture(params=["per-example", *[k.__name__ for k in KERNELS]])
def varlen_path(request, monkeypatch):
    """Each way varlen_attention can compute: the CPU's per-example reference, or the kernel call
    (with a stand-in kernel of each signature)."""
    if request.param != "per-example":
        monkeypatch.setattr(attention, "varlen_attn", next(k for k in KERNELS if k.__name__ == request.param))
        monkeypatch.setattr(attention, "attend", lambda q, k, v, cu, length, scale:
                            attention.flash_varlen(q, k, v, cu, length, scale))
    return request.param


def packed_loss_and_grads(model, batch):
    model.zero_grad()
    loss = reply_token_loss(model, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"])[0]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_varlen_trains_as_sdpa_does_on_a_packed_batch(small_lora_model, reply_features, varlen_path):
    tokenizer, rows = reply_features
    batch = make_collator(tokenizer, packing=True, flash_attention=True)(rows)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1] and len(batch["cu_seq_lens_q"]) == 5
    model = small_lora_model()
    sdpa_loss, sdpa_grads = packed_loss_and_grads(model, batch)  # sdpa's block-diagonal mask from position_ids
    attention.register()
    model.set_attn_implementation(attention.VARLEN)
    try:
        loss, grads = packed_loss_and_grads(model, batch)
    finally:
        model.set_attn_implementation("sdpa")
    assert loss == pytest.approx(sdpa_loss, abs=1e-5)
    for name in sdpa_grads:
        torch.testing.assert_close(grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_the_kernel_call_keeps_scale_heads_and_causality(monkeypatch, kernel):
    monkeypatch.setattr(attention, "varlen_attn", kernel)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(20, heads, 8, generator=generator) for heads in (6, 2, 2))
    cu_seq_lens = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    for scale in (8 ** -0.5, 0.2):  # the model's own scale, and another one that torch 2.10 cannot take
        want = attention.per_example(query, key, value, cu_seq_lens, scale)
        torch.testing.assert_close(attention.flash_varlen(query, key, value, cu_seq_lens, 12, scale), want)


def test_sdpa_gets_the_packed_mask_transformers_would_build(small_lora_model, reply_features):
    """Handed over by roletune's loss (no value read back to build it), the mask is transformers' own: the
    same booleans, and the same hidden states bit for bit as a forward that leaves the mask to transformers."""
    from transformers.masking_utils import create_causal_mask

    tokenizer, rows = reply_features
    batch = make_collator(tokenizer, packing=True)(rows)
    model = small_lora_model()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    given = attention.without_mask_building(model, inputs)["attention_mask"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    built = create_causal_mask(model.config, embeds, None, None, batch["position_ids"])  # no mask, no cache
    assert given.dtype == built.dtype == torch.bool and torch.equal(given, built)
    assert not given[0, 0].all() and given[0, 0].tril().equal(given[0, 0])  # examples apart, causal
    with torch.no_grad():
        want = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
        got = model(**inputs, attention_mask=given, output_hidden_states=True, use_cache=False).hidden_states[-1]
    assert torch.equal(got, want)


@pytest.mark.parametrize("config, given", [
    ({"use_sliding_window": False, "sliding_window": 4096}, True),  # Qwen2's default: no window
    ({"use_sliding_window": True, "sliding_window": 4096}, False),
    ({"sliding_window": 4096}, False),  # Mistral: a window whenever one is set
    ({"sliding_window": None}, True),
    ({"layer_types": ["full_attention", "sliding_attention"]}, False),
])
def test_a_model_with_sliding_window_layers_builds_its_own_masks(config, given):
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", **config))
    inputs = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1, 2]])}
    assert ("attention_mask" in attention.without_mask_building(model, inputs)) is given


def test_generation_with_varlen_is_generation_with_sdpa(small_lora_model, reply_features):
    """No packed boundaries: sdpa with sdpa's masks, here on a left-padded batch of two prompts."""
    tokenizer, _ = reply_features
    tokenizer.padding_side = "left"
    prompts = tokenizer(["今天海上风大吗？", "灯塔"], return_tensors="pt", padding=True)
    assert (prompts["attention_mask"] == 0).any()
    model = small_lora_model()
    model.eval()

    def generate():
        return model.generate(**prompts, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    want = generate()
    attention.register()
    model.set_attn_implementation(attention.VARLEN)
    try:
        got = generate()
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, want)


def test_the_probe_accepts_a_kernel_that_agrees_and_refuses_one_that_does_not(monkeypatch, tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    cpu = torch.device("cpu")
    for kernel in KERNELS:
        monkeypatch.setattr(attention, "varlen_attn", kernel)
        assert attention.probe(config, cpu, torch.float32) is None, kernel.__name__
    monkeypatch.setattr(attention, "varlen_attn", not_causal)
    assert attention.probe(config, cpu, torch.float32).startswith("the kernel's output differs from the reference")

    def refuses(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore")
    monkeypatch.setattr(attention, "varlen_attn", refuses)
    assert attention.probe(config, cpu, torch.float32) == \
        "the kernel failed: FlashAttention only supports Ampere GPUs or newer."
    assert attention.kernel_problem(config, cpu, torch.float32) == "the kernel runs on CUDA GPUs only"


def run(config_file, tmp_path, name, **model_settings):
    rows = [{"instruction": f"第{i}个问题：" + "风" * (i % 7), "output": "好" * (1 + i % 5) + "。"} for i in range(12)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = load_config(config_file(data={"path": str(data)}, output_dir=str(tmp_path / name),
                                  model=model_settings, train={"max_steps": 3, "save_steps": 100}))
    lines = []
    result = train.run(cfg, echo=lines.append)
    return result, lines


@pytest.mark.slow
def test_a_varlen_run_has_the_losses_of_an_sdpa_run(config_file, tmp_path, monkeypatch):
    seen = []
    per_example = attention.per_example
    monkeypatch.setattr(attention, "per_example", lambda *args: seen.append(args[3]) or per_example(*args))
    sdpa, _ = run(config_file, tmp_path, "sdpa", attn_implementation="sdpa")
    assert seen == []
    varlen, _ = run(config_file, tmp_path, "varlen", attn_implementation="varlen")
    assert len(seen) >= 3 * 2  # every layer of every step took the boundaries from the batch
    assert [loss for _, loss in varlen.losses] == pytest.approx([loss for _, loss in sdpa.losses], abs=1e-5)
    saved = Path(tmp_path / "varlen" / "roletune.yaml").read_text(encoding="utf-8")
    assert "attn_implementation: varlen" in saved


def test_auto_trains_with_sdpa_where_the_kernel_cannot_run(config_file, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "per_example", lambda *args: seen.append(args))
    result, lines = run(config_file, tmp_path, "auto")  # the default: auto, on the CPU
    assert seen == [] and result.losses
    assert not any(line.startswith("attention:") for line in lines)  # nothing to say off a GPU
