"""The fused LoRA branch: peft's masks, losses and gradients from one autograd node per adapted projection,
and peft's own forward wherever the fused one would not compute the same."""
import collections

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from roletune.speed import lora_fused
from roletune.speed.lora_dropout import recompute_lora_dropout
from roletune.speed.lora_fused import fuse_lora_layers

# CUDA too where there is one: there F.dropout is the native_dropout kernel the branch then draws with.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lora_layers(model) -> list:
    import peft

    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def with_dropout(model, p: float):
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = torch.nn.Dropout(p)
    return model


def step(model, autocast: bool, device: str = "cpu"):
    """One training forward and backward from a fixed seed: the loss, the LoRA gradients, the next draws."""
    model.to(device).train()
    ids = torch.arange(3, 43, device=device)[None]
    torch.manual_seed(1)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, torch.rand(4, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_branch_gives_pefts_loss_and_gradients_and_leaves_the_random_stream_as_it_does(
        small_lora_model, monkeypatch, autocast, p, device):
    """peft's own path (its dropout keeping its masks) against the fused branch, in fp32 and under bf16
    autocast (as Trainer runs on a GPU): the same loss and LoRA gradients, and the random numbers drawn next
    are the same (forward draws the same masks, the backward's redraw does not move the stream)."""
    def fused_step():
        model = with_dropout(small_lora_model(), p)
        recompute_lora_dropout(model)
        assert fuse_lora_layers(model) == len(lora_layers(model)) > 0
        return step(model, autocast, device)

    want_loss, want, want_next = step(with_dropout(small_lora_model(), p), autocast, device)
    got_loss, got, got_next = fused_step()
    assert torch.equal(got_next, want_next)
    assert got.keys() == want.keys() and all(g is not None and g.dtype == torch.float32 for g in got.values())
    if not autocast:  # fp32: only the fused add's order of operations differs
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        return
    # bf16: the fused add rounds once where peft rounds the product and then the sum, a difference that
    # grows through the layers (the loss moves in the 4th digit) ...
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)
    # ... and is the only one: with the add rounded as peft rounds it, every bit is peft's.
    monkeypatch.setattr(lora_fused, "_add_product", lambda result, h, b: result + h @ b.t())
    got_loss, got, _ = fused_step()
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_on_a_gpu_the_dropout_kernel_is_f_dropouts_own_and_its_gradient_is_its_mask(monkeypatch):
    """Where F.dropout runs the fused native_dropout kernel (CUDA), the branch draws with it and sends the
    gradient back through its 1-byte mask. Checked here by running that path on the CPU against autograd
    through torch.native_dropout with the same seed."""
    monkeypatch.setattr(lora_fused, "FUSED_DROPOUT_DEVICES", {"cpu"})
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    result = torch.randn(2, 5, 12, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)

    torch.manual_seed(7)
    got = lora_fused._LoraBranch.apply(result, x, a, b, 2.0, 0.25, torch.float32)
    torch.manual_seed(7)
    dropped, _ = torch.native_dropout(x, 0.25, True)
    want = result + (dropped @ a.t() @ b.t()) * 2.0
    torch.testing.assert_close(got, want)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (result, x, a, b), upstream)
    want_grads = torch.autograd.grad(want, (result, x, a, b), upstream)
    for name, g, w in zip(("result", "x", "a", "b"), got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


class Calls(TorchDispatchMode):
    """Counts the operators that run kernels (views and metadata changes left out)."""
    VIEWS = {"view", "_unsafe_view", "t", "transpose", "reshape", "expand", "unsqueeze", "squeeze", "detach",
             "alias", "as_strided", "slice", "select", "empty", "new_empty"}  # allocations: no kernel

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def graph_nodes(tensor) -> int:
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_one_autograd_node_and_fewer_kernels_per_adapted_projection(small_lora_model):
    """The point of fusing: per adapted projection, one autograd node for the branch instead of peft's
    several, and fewer kernel launches forward and backward (counted on the CPU under bf16 autocast, with
    the redrawn dropout; CUDA's dropout is one kernel where the CPU's is four, on both paths)."""
    def measure(fused: bool):
        model = with_dropout(small_lora_model(), 0.1)
        recompute_lora_dropout(model)
        if fused:
            fuse_lora_layers(model)
        model.train()
        layer = model.base_model.model.model.layers[1].self_attn.q_proj
        layer.base_layer.to(torch.bfloat16)  # a bf16 base, as trained on a GPU
        x = torch.randn(1, 24, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
        calls = Calls()
        with calls, torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        nodes = graph_nodes(out)
        with calls:
            out.float().sum().backward()
        return nodes, sum(calls.count.values())

    (peft_nodes, peft_calls), (fused_nodes, fused_calls) = measure(False), measure(True)
    # The fused output's graph: the branch, the base projection and the leaves (14 nodes for peft's, 7 here);
    # 31 operators against 26 here, on a GPU (one dropout kernel each time instead of four) 22 against 16.
    assert fused_nodes <= peft_nodes - 6
    assert fused_calls <= peft_calls - 3  # a margin for other torch versions' CPU decompositions


def test_a_training_forward_casts_every_layers_adapter_at_once(small_lora_model, monkeypatch):
    """At the start of each training forward the model casts all its lora_A and scaling * lora_B weights
    with three multi-tensor operators; the branches then cast none of their own (two operators each
    otherwise). Same loss and gradients either way, bit for bit."""
    def measure():
        model = with_dropout(small_lora_model(), 0.1)
        recompute_lora_dropout(model)
        fuse_lora_layers(model)
        step(model, autocast=True)  # the first forward also allocates the copies
        model.zero_grad()
        calls = Calls()
        with calls:
            loss, grads, _ = step(model, autocast=True)
        return calls.count, loss, grads

    got_calls, got_loss, got = measure()
    monkeypatch.setattr(lora_fused.AdapterCopies, "refresh", lambda *args: None)  # no copies: each branch
    monkeypatch.setattr(lora_fused.AdapterCopies, "get", lambda *args: None)      # casts its own
    want_calls, want_loss, want = measure()
    branches = len(lora_layers(small_lora_model()))
    assert got_calls["_foreach_copy_"] == 2 and got_calls["_foreach_mul"] == 1
    assert sum(want_calls.values()) - sum(got_calls.values()) == 2 * branches - 3
    assert torch.equal(got_loss, want_loss) and all(torch.equal(got[name], want[name]) for name in want)


def test_pefts_own_forward_runs_wherever_the_fused_one_would_not_compute_the_same(small_lora_model):
    model = with_dropout(small_lora_model(), 0.1)
    recompute_lora_dropout(model)
    fuse_lora_layers(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 6, layer.in_features)

    def fused() -> bool:
        return lora_fused._plan(layer, x.dtype, x.device.type, None) is not None

    model.train()
    assert fused()
    with torch.no_grad():
        assert not fused()  # dropout without a backward
    model.eval()
    assert not fused()  # gradients through an eval-mode forward
    with torch.no_grad():
        assert fused()  # generation and eval loss
    model.train()
    with model.disable_adapter():  # compare's base column
        assert not fused()
    layer.cast_input_dtype_enabled = True  # lora.dtype=fp32 copies a bf16 input to fp32 first
    assert not lora_fused._plan(layer, torch.bfloat16, "cpu", None)
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)  # peft's dropout keeps its mask
    assert not fused()


@pytest.mark.slow
def test_training_with_the_fused_branch_ends_with_the_adapter_pefts_branch_trains(short_run, monkeypatch):
    """roletune train, 4 steps at a high learning rate with dropout 0.1, fused and not: the same losses,
    gradient norms and adapter (float32 on the CPU: the fused add may round in another order)."""
    branches = []
    apply = lora_fused._LoraBranch.apply
    monkeypatch.setattr(lora_fused._LoraBranch, "apply", lambda *args: branches.append(1) or apply(*args))
    want, want_log = short_run("peft", lora={"dropout": 0.1, "fused": False})
    assert not branches
    got, got_log = short_run("fused", lora={"dropout": 0.1})  # on by default
    assert len(branches) == 4 * 14  # 4 steps of 2 layers with 7 adapted projections each
    assert len(got_log) == 8 and got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def answers(model, ids, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of an eval-mode forward without gradients (generation's)."""
    model.eval()
    with torch.inference_mode():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=12, min_new_tokens=12, pad_token_id=0, eos_token_id=None, **options)
        return tokens, model(input_ids=ids).logits


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_eval_forwards_and_generation_give_pefts_answers(small_lora_model, base_dtype, adapter_dtype):
    """Generation and the eval loss take the fused path's plainer form: peft's logits and greedy tokens, for an
    fp32 base and a bf16 one, with adapters as training keeps them (bf16 on bf16) and as peft loads them for
    inference (fp32, its input cast up)."""
    if adapter_dtype == torch.bfloat16 and base_dtype == torch.float32:
        pytest.skip("roletune refuses bf16 adapters on an fp32 base (model.check_lora_dtype)")

    def build(fused: bool):
        model = small_lora_model()
        model.base_model.model.to(base_dtype)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(adapter_dtype)
        if fused:
            fuse_lora_layers(model)
        return model

    ids = torch.arange(5, 17)[None]
    want_tokens, want_logits = answers(build(False), ids)
    calls = Calls()
    with calls:
        got_tokens, got_logits = answers(build(True), ids)
    assert calls.count["_foreach_copy_"] > 0  # the fused path did run
    if base_dtype == torch.float32:
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    else:  # bf16: the scaling is folded into lora_B's copy, rounded there instead of on the product
        torch.testing.assert_close(got_logits.float(), want_logits.float(), rtol=0.02, atol=0.02)
    assert torch.equal(got_tokens, want_tokens)


def test_an_eval_forward_launches_three_kernels_per_adapted_projection(small_lora_model):
    """Per adapted projection: the two r-wide matmuls and the add into the base's output, where peft runs its
    two matmuls, the scaling and the add (and its dropout, where there is one); the copies cost three
    multi-tensor kernels per forward."""
    def measure(fused: bool):
        model = small_lora_model().eval()
        if fused:
            fuse_lora_layers(model)
        with torch.no_grad():
            model(input_ids=torch.arange(3, 9)[None])  # the first forward also allocates the copies
        calls = Calls()
        with calls, torch.no_grad():
            model(input_ids=torch.arange(3, 9)[None])
        return calls.count

    peft, fused = measure(False), measure(True)
    branches = len(lora_layers(small_lora_model()))
    assert fused["_foreach_copy_"] == 2 and fused["_foreach_mul"] == 1
    assert sum(peft.values()) - sum(fused.values()) == branches - 3


def test_generation_sees_the_adapter_as_it_is_now(small_lora_model):
    """peft's generate calls the inner model, not the PeftModel, and an optimizer step changes the adapter in
    place between forwards: the copies are refreshed as the decoder's forward starts, so generation after a
    step answers with the stepped adapter. Made during generation (inference mode), they still serve training
    forwards afterwards."""
    model = small_lora_model()
    fuse_lora_layers(model)
    ids = torch.arange(5, 17)[None]
    answers(model, ids)  # the copies are first made in inference mode, as sample answers before training do
    step(model, autocast=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(parameter.grad, alpha=-50.0)  # an optimizer step, in place
    got_tokens, got_logits = answers(model, ids)
    reference = small_lora_model()  # the same adapter through peft's own forward
    reference.load_state_dict(model.state_dict())
    want_tokens, want_logits = answers(reference, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    assert not torch.allclose(got_logits, answers(small_lora_model(), ids)[1], atol=1e-3)  # the step changed them


def test_every_layer_is_planned_as_the_forward_starts_and_forgets_it_when_it_ends(small_lora_model):
    """The per-call checks run once a forward for all layers (lora_fused._Plan); nothing of a plan outlives its
    forward, even one that raised, so a layer called on its own, or recomputed in a backward, checks in full."""
    model = small_lora_model().eval()
    fuse_lora_layers(model)
    layers = lora_layers(model)
    seen = []
    hook = layers[3].register_forward_pre_hook(lambda module, args: seen.append(
        [layer.__dict__[lora_fused.PLAN] is not None for layer in layers]))
    with torch.no_grad():
        model(input_ids=torch.arange(3, 9)[None])
    assert seen == [[True] * len(layers)]
    assert all(layer.__dict__[lora_fused.PLAN] is None for layer in layers)
    hook.remove()

    def fail(module, args):
        raise RuntimeError("a forward that fails half-way")

    hook = layers[3].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="half-way"):
        model(input_ids=torch.arange(3, 9)[None])
    hook.remove()
    assert all(layer.__dict__[lora_fused.PLAN] is None for layer in layers)


def test_switching_the_adapter_off_and_on_between_forwards_is_seen_by_the_next_one(small_lora_model):
    """compare's base column turns the adapter off around a generation: each forward plans anew."""
    base = small_lora_model()
    ids = torch.arange(5, 17)[None]
    with base.disable_adapter():
        want_base = answers(base, ids)[1]
    want_tuned = answers(base, ids)[1]
    model = small_lora_model()
    fuse_lora_layers(model)
    torch.testing.assert_close(answers(model, ids)[1], want_tuned, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(answers(model, ids)[1], want_base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(answers(model, ids)[1], want_tuned, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_base, want_tuned, atol=1e-3)


def test_a_base_projection_with_a_hook_is_still_called_as_a_module(small_lora_model):
    """The plan calls F.linear for a plain base nn.Linear; one that a hook watches (or whose forward was
    replaced, as accelerate's offloading does) is called as before, hook and all."""
    model = small_lora_model().eval()
    fuse_lora_layers(model)
    layers = lora_layers(model)
    calls = []
    layers[0].base_layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(input_ids=torch.arange(3, 9)[None])
        model(input_ids=torch.arange(3, 9)[None])
    assert calls == [1, 1]
    with torch.no_grad():
        plans = [lora_fused._plan(layer, torch.float32, "cpu", None) for layer in layers]
    assert plans[0].base is None and all(plan.base is not None for plan in plans[1:])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_generate_call_copies_the_adapter_once_and_the_next_call_copies_it_again(small_lora_model, monkeypatch,
                                                                                   cache):
    """The adapter does not change within one generate call: its first forward makes the copies and plans and
    the later steps, decoding on from the KV cache, keep them; the next call (after an optimizer step, say)
    makes them anew, and answers as peft does with the stepped adapter. With generate's default cache and with
    a static one (whose length is known only on the device, as CUDA graphs decode)."""
    options = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
    model = small_lora_model()
    fuse_lora_layers(model)
    ids = torch.arange(5, 17)[None]
    plans, plan = [], lora_fused._plan
    monkeypatch.setattr(lora_fused, "_plan", lambda *args: plans.append(1) or plan(*args))
    calls = Calls()
    with calls:
        answers(model, ids, **options)  # 12 tokens, then one more forward for the logits
    assert calls.count["_foreach_mul"] == 2  # the generate call's first forward, and the plain forward
    assert len(plans) == 2 * len(lora_layers(model))  # the same two forwards plan; every layer in each
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(3.0)  # changed in place between calls, as an optimizer step does
    reference = small_lora_model()
    reference.load_state_dict(model.state_dict())
    got, want = answers(model, ids, **options), answers(reference, ids)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_a_kept_plan_is_not_used_once_the_adapter_is_switched_off(small_lora_model):
    """A KV cache carried from one generate call into the next (which roletune does not do, a caller might)
    continues a generation: its plans are kept only while the adapter is still on, as it was."""
    model = small_lora_model().eval()
    fuse_lora_layers(model)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.arange(5, 17)[None], past_key_values=cache, use_cache=True)
        with model.disable_adapter():
            got = model(input_ids=torch.tensor([[17]]), past_key_values=cache, use_cache=True).logits
    reference = small_lora_model().eval()
    cache = transformers.DynamicCache()
    with torch.no_grad():
        reference(input_ids=torch.arange(5, 17)[None], past_key_values=cache, use_cache=True)
        with reference.disable_adapter():
            want = reference(input_ids=torch.tensor([[17]]), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_each_dtypes_copies_are_made_once_and_refreshed_in_place(small_lora_model):
    """Training under bf16 autocast and sample answers without it alternate between bf16 and fp32 copies of
    the adapter. Each dtype's copies stay the same tensors all run, refreshed in place: CUDA graphs
    (roletune.speed.layer_graphs) read the training copies by address, so new ones would leave them stale."""
    model = small_lora_model()
    fuse_lora_layers(model)
    copies = lora_fused._copies[lora_layers(model)[0]]
    step(model, autocast=True)
    trained = copies.a[0]
    assert trained.dtype == torch.bfloat16
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 9)[None], use_cache=False)
    assert copies.a[0].dtype == torch.float32
    with torch.no_grad():
        lora_layers(model)[0].lora_A["default"].weight.add_(1.0)
    step(model, autocast=True)
    assert copies.a[0] is trained  # the same tensor, with the new weight in it
    torch.testing.assert_close(trained, lora_layers(model)[0].lora_A["default"].weight.to(torch.bfloat16))
