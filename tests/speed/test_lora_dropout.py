"""LoRA dropout recomputed in backward: the same masks, losses and adapter as peft's path, while the
dropped-out copies of the inputs are no longer kept for backward."""
import pytest
import torch

from roletune.config import LoraConfig
from roletune.speed.lora_dropout import DeferredDropout, recompute_lora_dropout


@pytest.mark.slow
def test_recomputed_dropout_trains_the_adapter_peft_trains(short_run):
    want, want_log = short_run("kept", lora={"dropout": 0.1, "recompute_dropout": False})
    got, got_log = short_run("recomputed", shared=True, lora={"dropout": 0.1})  # on by default
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)


def test_the_dropped_out_inputs_are_no_longer_kept(small_lora_model, saved_bytes):
    import peft

    torch.manual_seed(0)
    kept_model = small_lora_model()
    for module in kept_model.modules():  # the seed's dropout
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    ids = torch.randint(0, 1000, (1, 64))
    before = saved_bytes(kept_model, lambda: kept_model(input_ids=ids, use_cache=False))
    layers = recompute_lora_dropout(kept_model)
    after = saved_bytes(kept_model, lambda: kept_model(input_ids=ids, use_cache=False))
    lora_layers = [m for m in kept_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers == len(lora_layers) > 0
    assert all(isinstance(m.lora_dropout["default"], DeferredDropout) for m in lora_layers)
    # peft kept, per adapted projection, a dropped-out copy of its input (fp32 here) and the mask.
    copies = sum(64 * m.in_features * 4 for m in lora_layers)
    assert before - after >= copies
    kept_model.eval()  # eval: no dropout at all, the plain projection
    with torch.no_grad():
        first, second = (kept_model(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype, deferred", [("auto", True), ("fp32", False)])
def test_applied_unless_lora_inputs_are_copied_to_fp32_anyway(tiny_model, dtype, deferred):
    from transformers import AutoModelForCausalLM

    from roletune.speed.levers import add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.1, dtype=dtype))
    assert any(isinstance(m, DeferredDropout) for m in model.modules()) is deferred


@pytest.mark.parametrize("autocast", [False, True])
def test_redrawn_masks_give_pefts_gradients_and_leave_the_random_stream_as_it_does(small_lora_model, autocast):
    """One step with peft's kept dropout and one with the redrawn one, in fp32 and under bf16 autocast (as
    Trainer runs on a GPU): the same loss and LoRA gradients, and the random numbers drawn next are the
    same (the backward's redraw does not move the stream)."""
    import peft

    def step(recompute: bool):
        model = small_lora_model()
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_dropout["default"] = torch.nn.Dropout(0.3)
        if recompute:
            assert recompute_lora_dropout(model) > 0
        model.train()
        ids = torch.arange(3, 43)[None]
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, torch.rand(4)

    (want_loss, want, want_next), (got_loss, got, got_next) = step(False), step(True)
    assert torch.equal(got_loss, want_loss) and torch.equal(got_next, want_next)
    assert got.keys() == want.keys() and all(g is not None for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)
