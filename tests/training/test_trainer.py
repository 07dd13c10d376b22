"""roletune's Trainer keeps Trainer's per-step bookkeeping (FLOP tally, gradient clipping, the
non-finite guard) without walking the model's module tree again every step."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from roletune import train
from roletune.config import load_config
from roletune.training import stopping
from roletune.training.trainer import StepBookkeeping, clear_grads


class CountWalks(TrainerCallback):
    """Counts the walks over a module tree that start during optimizer steps `first`..`last`."""

    def __init__(self, monkeypatch, first: int, last: int):
        self.first, self.last, self.counting, self.walks = first, last, False, []
        self.trainer_flops = []
        walk = torch.nn.Module.named_modules

        def counted(module, memo=None, prefix="", remove_duplicate=True):
            if memo is None and self.counting:  # a walk starts here; its recursive calls pass memo
                self.walks.append(type(module).__name__)
            return walk(module, memo, prefix, remove_duplicate)
        monkeypatch.setattr(torch.nn.Module, "named_modules", counted)

    def on_step_begin(self, args, state, control, **kwargs):
        self.counting = self.first <= state.global_step + 1 <= self.last

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer_flops.append(state.total_flos)


def run(config_file, tmp_path, callbacks, **train_settings):
    cfg = load_config(config_file(output_dir=str(tmp_path / "run"),
                                  train={"max_steps": 5, "save_steps": 100, "logging_steps": 100, **train_settings}))
    return train.run(cfg, callbacks=callbacks, echo=lambda *_: None), Path(cfg.output_dir)


@pytest.mark.slow
def test_a_step_does_not_walk_the_module_tree(config_file, tmp_path, monkeypatch):
    """The FLOP count, the clipping, the guard, zeroing the gradients and the loss use what was listed
    once (with transformers' and accelerate's own code: five walks a step)."""
    counter = CountWalks(monkeypatch, 2, 4)
    result, _ = run(config_file, tmp_path, (counter,))
    assert result.optimizer_steps == 5
    assert counter.walks == []


def test_clearing_the_listed_gradients_is_module_zero_grad(small_lora_model):
    model = small_lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for set_to_none in (True, False):
        states = []
        for zero in (lambda: torch.nn.Module.zero_grad(model, set_to_none), lambda: clear_grads(trainable, set_to_none)):
            for i, p in enumerate(trainable[::2]):
                p.grad = torch.full_like(p, float(i + 1))
            zero()
            states.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        assert [g is None for g in states[0]] == [g is None for g in states[1]]
        assert all(a is None or torch.equal(a, b) for a, b in zip(*states))
        assert any(g is not None for g in states[0]) != set_to_none  # zeroed tensors, or none left


@pytest.mark.slow
def test_the_flop_tally_is_transformers_own(config_file, tmp_path):
    """total_flos is transformers' 6 x tokens x non-embedding parameters, summed over the micro-batches."""
    seen = []

    class Batches(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            seen.append(model)

    _, out = run(config_file, tmp_path, (Batches(),), grad_accum=2)
    model = seen[0]
    state = json.loads((out / "trainer_state.json").read_text())
    per_token = 6 * model.num_parameters(exclude_embeddings=True)
    tokens = state["num_input_tokens_seen"]  # packed batches: every input token is a real one
    assert state["total_flos"] == pytest.approx(per_token * tokens, rel=1e-9)
    stand_in = type("StandIn", (), {"model": model})()
    batch = {"input_ids": torch.zeros(1, 37, dtype=torch.long)}
    assert Trainer.floating_point_ops(stand_in, batch) == per_token * 37


@pytest.mark.slow
def test_the_guard_checks_the_norm_the_trainer_clipped_with(config_file, tmp_path, monkeypatch):
    """Taken from clipping, the guard's norm is the one Trainer logs; the guard computes none of its own
    (tests/test_guard.py checks that it still stops and skips)."""
    by_guard = []
    norm = torch.nn.utils.get_total_norm

    def counted(*args, **kwargs):
        # Clipping computes norms too (accelerate's clip_grad_norm_ through this very function): only a call
        # with the guard's code on the stack, directly or through a helper, is the guard's.
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals is not vars(stopping):
            frame = frame.f_back
        if frame is not None:
            by_guard.append(1)
        return norm(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    _, out = run(config_file, tmp_path, (), logging_steps=1)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert len([entry["grad_norm"] for entry in history if "grad_norm" in entry]) == 5
    assert by_guard == []
    # Where the trainer has no norm to hand over (a sharded run), the guard computes it, once a step.
    monkeypatch.setattr(StepBookkeeping, "take_step_grad_norm", lambda self: None)
    run(config_file, tmp_path / "own-norm", ())
    assert by_guard == [1] * 5


@pytest.mark.parametrize("attn_implementation, run_ahead, waits_expected", [
    ("varlen", True, {}),
    ("sdpa", True, {}),
    ("varlen", False, {"roletune/training/stopping.py": 2}),  # before each update
], ids=["varlen", "sdpa", "varlen-waiting"])
@pytest.mark.slow
def test_steps_follow_each_other_without_waiting_for_the_device(
        config_file, tmp_path, device_waits, attn_implementation, run_ahead, waits_expected):
    """Trainer reads each micro-batch's loss (its non-finite filter) and token count back from the device,
    so the host waits for every backward before queueing the next micro-batch; the guard's check before each
    update and transformers' packed-sequence check as each forward starts would make it wait too. roletune
    counts a packed batch's tokens by its size, needs the filter only with on_nonfinite=skip, reads the
    guard's verdict a step late (run_ahead) and hands the model a packed batch's mask (attention
    .without_mask_building). Watched: two whole steps between logs and checkpoints, from the start of one
    to the start of the step after them."""
    waits = device_waits()

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 2:
                waits.__enter__()
            if state.global_step + 1 == 4:
                waits.__exit__(None, None, None)

    cfg = load_config(config_file(
        model={"attn_implementation": attn_implementation}, output_dir=str(tmp_path / "run"),
        train={"max_steps": 5, "save_steps": 100, "logging_steps": 100, "grad_accum": 2, "batch_size": 2,
               "run_ahead": run_ahead}))
    train.run(cfg, callbacks=(Watch(),), echo=lambda *_: None)
    places = [where for _, _, where in waits.calls]
    assert {place: places.count(place) for place in places} == waits_expected, places
    state = json.loads((Path(cfg.output_dir) / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] > 0


@pytest.mark.parametrize("run_ahead", [True, False])
def test_on_a_gpu_batches_are_copied_from_pinned_memory_without_waiting(config_file, run_ahead):
    """A blocking copy to the GPU makes the host wait for everything queued before it (the last step)."""
    from roletune.training.trainer import training_arguments

    cfg = load_config(config_file(model={"dtype": "fp32"}, train={"run_ahead": run_ahead}))
    on_gpu = training_arguments(cfg, torch.device("cuda:0"))  # only built: nothing runs on the GPU here
    assert on_gpu.dataloader_pin_memory
    assert on_gpu.accelerator_config.non_blocking is run_ahead
    assert training_arguments(cfg, torch.device("cpu")).accelerator_config.non_blocking is False
