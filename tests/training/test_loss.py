"""The chunked LM-head loss changes nothing but memory: its loss and LoRA gradients are those of
the full-logits path, tied or untied head, padded or packed, and so is a short training run."""
import json
from pathlib import Path

import pytest
import torch

from roletune import train
from roletune.config import load_config
from roletune.data.tokenize import IGNORE_INDEX
from roletune.errors import ConfigError
from roletune.training import loss
from roletune.training.batching import make_collator, reply_token_loss

from conftest import assert_close_at_scale

ROWS = 7  # positions per chunk: fewer than the trained tokens, which it does not divide


@pytest.fixture(scope="module", params=[True, False], ids=["tied-head", "own-head"])
def lora_model(request, small_lora_model):
    model = small_lora_model(tie_word_embeddings=request.param)
    base = model.get_base_model()
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == request.param
    return model


@pytest.fixture(scope="module")
def features(reply_features):
    return reply_features


def loss_and_grads(model, batch, head_loss, num_items=None):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    value = reply_token_loss(model, inputs, batch["labels"], num_items, head_loss)[0]
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing, rows", [(False, ROWS), (True, ROWS), (True, 10_000)],
                         ids=["padded", "packed", "packed-one-chunk"])
def test_chunked_loss_and_lora_gradients_equal_the_full_logits(lora_model, features, packing, rows):
    tokenizer, examples = features
    batch = make_collator(tokenizer, packing=packing)(examples)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if rows == ROWS:
        assert trained > 2 * ROWS and trained % ROWS  # several chunks and a ragged last one
    else:
        assert trained <= rows  # one chunk, computed without the recompute
    want, want_grads = loss_and_grads(lora_model, batch, None)
    got, got_grads = loss_and_grads(lora_model, batch, loss.ChunkedCrossEntropy(rows))
    assert got == pytest.approx(want, abs=1e-5)
    assert any(g.abs().sum() > 0 for g in want_grads.values())
    for name in want_grads:
        assert_close_at_scale(got_grads[name], want_grads[name], 1e-4, name)


def test_chunked_loss_is_divided_by_the_steps_token_count(lora_model, features):
    tokenizer, rows = features
    batch = make_collator(tokenizer, packing=True)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():  # also the eval path: no graph, nothing to recompute
        mean = reply_token_loss(lora_model, inputs, batch["labels"], None, loss.ChunkedCrossEntropy(ROWS))[0]
        step = reply_token_loss(lora_model, inputs, batch["labels"], 3 * trained, loss.ChunkedCrossEntropy(ROWS))[0]
        full_step = reply_token_loss(lora_model, inputs, batch["labels"], 3 * trained)[0]
    assert step.item() == pytest.approx(mean.item() / 3, rel=1e-6)
    assert step.item() == pytest.approx(full_step.item(), abs=1e-6)


def test_a_micro_batch_without_trained_tokens_still_reaches_the_adapter(lora_model, features):
    # A DDP rank whose micro-batch is all filler must still run a backward, or the other ranks wait for it.
    tokenizer, rows = features
    batch = make_collator(tokenizer, packing=True)(rows[:1])
    batch["labels"][:] = IGNORE_INDEX
    value, grads = loss_and_grads(lora_model, batch, loss.ChunkedCrossEntropy(ROWS), num_items=1)
    assert value == 0 and all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_auto_picks_chunked_here_and_full_where_the_head_is_sharded(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loss.head_loss_for("auto", 64, cpu, sharded=False) == loss.ChunkedCrossEntropy(64)
    assert loss.head_loss_for("chunked", 64, gpu, sharded=False) == loss.ChunkedCrossEntropy(64)
    assert loss.head_loss_for("auto", 64, gpu, sharded=True) is None
    assert loss.head_loss_for("full", 64, cpu, sharded=False) is None
    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: name == "liger_kernel" or None)
    monkeypatch.setattr(loss, "LigerCrossEntropy", lambda: "liger")  # the kernel itself runs on GPUs only
    assert loss.head_loss_for("auto", 64, gpu, sharded=False) == "liger"
    assert loss.head_loss_for("auto", 64, cpu, sharded=False) == loss.ChunkedCrossEntropy(64)


def test_auto_takes_chunked_where_liger_is_installed_but_cannot_load(monkeypatch, caplog):
    def broken():
        raise RuntimeError("triton 3.6 was built for another torch\nmore")

    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: name == "liger_kernel" or None)
    monkeypatch.setattr(loss, "LigerCrossEntropy", broken)
    assert loss.head_loss_for("auto", 64, torch.device("cuda", 0), sharded=False) == loss.ChunkedCrossEntropy(64)
    assert "chunked, not Liger-Kernel's (RuntimeError: triton 3.6 was built for another torch)" in caplog.text


@pytest.mark.parametrize("settings, message", [
    ({"lm_head_loss": "chunked", "reply_logits_only": False}, "needs train.reply_logits_only"),
    ({"lm_head_loss": "chunked", "distributed": "fsdp"}, "only a shard"),
    ({"loss_chunk": 0}, "loss_chunk=0: must be > 0"),
])
def test_impossible_chunked_settings_are_refused(config_file, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(train=settings))


def logged_losses(config_file, tmp_path, name, **train_settings):
    cfg = load_config(config_file(output_dir=str(tmp_path / name),
                                  train={"max_steps": 4, "logging_steps": 1, "save_steps": 100, **train_settings}))
    train.run(cfg, echo=lambda *_: None)
    history = json.loads((Path(cfg.output_dir) / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"], e["grad_norm"]) for e in history if "loss" in e]


@pytest.mark.slow
def test_short_run_logs_the_same_losses_chunked_or_not(config_file, tmp_path):
    full = logged_losses(config_file, tmp_path, "full", lm_head_loss="full")
    chunked = logged_losses(config_file, tmp_path, "chunked", lm_head_loss="chunked", loss_chunk=ROWS)
    assert [s for s, _, _ in chunked] == [s for s, _, _ in full] == [1, 2, 3, 4]
    assert [l for _, l, _ in chunked] == pytest.approx([l for _, l, _ in full], abs=1e-4)
    assert [g for _, _, g in chunked] == pytest.approx([g for _, _, g in full], rel=1e-3)
