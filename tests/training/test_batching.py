"""The speed levers change nothing but speed: packed = padded, reply-only logits = full logits,
and the loss of an optimizer step is the seed's token average however the step is split."""
import json
from pathlib import Path

import pytest
import torch

from roletune import train
from roletune.config import load_config
from roletune.speed import attention
from roletune.training.batching import (
    REPLY_INDEX,
    final_hidden_states,
    labelled_positions,
    make_collator,
    pad_packed,
    reply_token_loss,
    with_reply_index,
)
from roletune.training.loss import ChunkedCrossEntropy


@pytest.fixture(scope="module")
def lora_model(small_lora_model):
    return small_lora_model()


@pytest.fixture(scope="module")
def features(reply_features):
    return reply_features


def loss_and_grads(model, batch, loss_fn):
    model.zero_grad()
    loss = loss_fn(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_batch_equals_padded_batch(lora_model, features):
    tokenizer, rows = features
    padded = make_collator(tokenizer, packing=False)(rows)
    packed = make_collator(tokenizer, packing=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].numel() == sum(len(r["input_ids"]) for r in rows)
    assert (padded["attention_mask"] == 0).any()  # the padded batch really has padding
    want, want_grads = loss_and_grads(lora_model, padded, lambda b: lora_model(**b).loss)
    got, got_grads = loss_and_grads(
        lora_model, packed, lambda b: reply_token_loss(lora_model, {k: v for k, v in b.items() if k != "labels"},
                                                       b["labels"])[0])
    assert got == pytest.approx(want, abs=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_final_hidden_states_are_transformers_last_hidden_states_without_its_layer_hooks(small_lora_model, features):
    """The final norm's output, kept by a hook on the norm alone: transformers' output capture would hook every
    layer and attention module with code torch.compile cannot trace."""
    tokenizer, rows = features
    batch = make_collator(tokenizer, packing=True)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = small_lora_model()
    with torch.no_grad():
        _, hidden = final_hidden_states(model, inputs)
        layers_hooked = any(module._forward_hooks for name, module in model.named_modules() if "layers." in name)
        want = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
    assert not layers_hooked
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


@pytest.mark.parametrize("boundaries", [False, True], ids=["sdpa", "varlen"])
def test_a_packed_batch_padded_for_cuda_graphs_has_the_same_loss_and_gradients(lora_model, features, boundaries):
    tokenizer, rows = features
    batch = with_reply_index(make_collator(tokenizer, packing=True, flash_attention=boundaries))(rows)
    length = batch["input_ids"].shape[1]
    padded = pad_packed(batch, 16, tokenizer.pad_token_id)
    grown = padded["input_ids"].shape[1]
    assert grown % 16 == 0 and length < grown <= length + 16  # always at least one pad token
    assert (padded["labels"][0, length:] == -100).all() and padded["position_ids"][0, length:].tolist() == list(
        range(grown - length))
    if boundaries:  # the padding is an example of its own; the longest example is declared as long as the row
        assert padded["cu_seq_lens_q"].tolist() == [*batch["cu_seq_lens_q"].tolist(), grown]
        assert padded["max_length_q"] == padded["max_length_k"] == grown
        attention.register()
        lora_model.set_attn_implementation(attention.VARLEN)  # on the CPU: sdpa per example

    def loss(b):
        return reply_token_loss(lora_model, {k: v for k, v in b.items() if k != "labels"}, b["labels"])[0]
    try:
        want, want_grads = loss_and_grads(lora_model, batch, loss)
        got, got_grads = loss_and_grads(lora_model, padded, loss)
    finally:
        lora_model.set_attn_implementation("sdpa")
    assert got == pytest.approx(want, abs=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reply_only_logits_give_the_same_loss(lora_model, features):
    tokenizer, rows = features
    batch = make_collator(tokenizer, packing=False)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = labelled_positions(batch["labels"])
    assert 0 < len(positions) < batch["input_ids"].shape[1]  # fewer logits than positions
    with torch.no_grad():
        full = lora_model(**batch).loss.item()
        reply_only = reply_token_loss(lora_model, inputs, batch["labels"])[0].item()
    assert reply_only == pytest.approx(full, abs=1e-5)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_collators_reply_index_selects_the_trained_tokens_without_waiting_for_the_device(
        lora_model, features, packing, device_waits):
    """With the trained positions found while the batch is built, the loss selects them without any
    operator that makes the host wait for a GPU (transformers' own packed-sequence check is not ours);
    found in the loss instead, they need one. The loss and gradients are the same either way."""
    tokenizer, rows = features
    batch = with_reply_index(make_collator(tokenizer, packing=packing))(rows)
    labels = batch["labels"]
    rows_, columns = batch[REPLY_INDEX]
    assert torch.equal(labels[:, 1:][rows_, columns], labels[:, 1:][labels[:, 1:] != -100])

    def measured(inputs):
        waits = device_waits()
        with waits:
            value, grads = loss_and_grads(lora_model, inputs, lambda b: reply_token_loss(
                lora_model, {k: v for k, v in b.items() if k != "labels"}, labels, None, ChunkedCrossEntropy(5))[0])
        return value, grads, [name for name, ours, _ in waits.calls if ours]

    got, got_grads, our_waits = measured(batch)
    want, want_grads, their_waits = measured({k: v for k, v in batch.items() if k != REPLY_INDEX})
    assert our_waits == [] and their_waits
    assert got == pytest.approx(want, abs=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def write_rows(folder: Path, count: int) -> Path:
    rows = [{"instruction": f"第{i}个问题：" + "风" * (i % 7), "output": "好" * (1 + i % 5) + "。"} for i in range(count)]
    path = folder / "rows.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def run(config_file, tmp_path, name, **train_settings):
    data = write_rows(tmp_path, 16)
    cfg = load_config(config_file(data={"path": str(data)}, lora={"dropout": 0.0}, output_dir=str(tmp_path / name),
                                  train={"logging_steps": 1, "save_steps": 100, **train_settings}))
    result = train.run(cfg, echo=lambda *_: None)
    history = json.loads((Path(cfg.output_dir) / "trainer_state.json").read_text())["log_history"]
    return result, [entry["grad_norm"] for entry in history if "grad_norm" in entry]


@pytest.mark.slow
def test_step_loss_is_the_seeds_token_average(config_file, tmp_path):
    # The seed: 4 micro-batches of 4, padded. roletune: one packed micro-batch of 16. Same 16 rows.
    seed, seed_norms = run(config_file, tmp_path, "seed", batch_size=4, grad_accum=4, max_steps=1, packing=False,
                           reply_logits_only=False)
    fast, fast_norms = run(config_file, tmp_path, "fast", batch_size=16, grad_accum=1, max_steps=1)
    assert fast.losses[0][1] == pytest.approx(seed.losses[0][1], abs=1e-5)
    assert fast_norms[0] == pytest.approx(seed_norms[0], rel=1e-4)


@pytest.mark.slow
def test_short_run_matches_the_plain_trainer_path(config_file, tmp_path):
    plain, _ = run(config_file, tmp_path, "plain", batch_size=4, grad_accum=1, max_steps=4, packing=False,
                   reply_logits_only=False)
    fast, _ = run(config_file, tmp_path, "fast", batch_size=4, grad_accum=1, max_steps=4)
    assert [s for s, _ in fast.losses] == [s for s, _ in plain.losses] == [1, 2, 3, 4]
    assert [l for _, l in fast.losses] == pytest.approx([l for _, l in plain.losses], abs=1e-4)
