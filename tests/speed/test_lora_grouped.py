"""lora.grouped (roletune.speed.lora_grouped): the fused branches of projections that read one input share their
dropout draw and lora_A matmuls, and compute what the fused branches of their own compute."""
import pytest
import torch

from roletune.config import LoraConfig
from roletune.model import checkpoint_first_layers
from roletune.speed import graphs, lora_fused, lora_grouped
from roletune.speed.levers import add_lora
from roletune.speed.lora_dropout import recompute_lora_dropout
from roletune.speed.lora_grouped import fuse_lora

from conftest import assert_close_at_scale
from test_lora_fused import Calls, lora_layers, step, with_dropout


def fused_model(small_lora_model, p: float, grouped: bool):
    model = small_lora_model()  # without dropout peft's nn.Identity, which the fused branch takes as p = 0
    if p:
        recompute_lora_dropout(with_dropout(model, p))
    fuse_lora(model, grouped=grouped)
    return model


@pytest.fixture
def led(monkeypatch) -> list:
    """How many members each SharedInput call served, as the calls come."""
    calls = []
    apply = lora_grouped.SharedInput.apply
    monkeypatch.setattr(lora_grouped.SharedInput, "apply", lambda *args: calls.append(args[1].shape[0]) or apply(*args))
    return calls


def assert_same_step(got, want, bf16: bool):
    (got_loss, got_grads, got_next), (want_loss, want_grads, want_next) = got, want
    assert torch.equal(got_next, want_next)  # the random stream goes on as it did
    assert got_grads.keys() == want_grads.keys() and all(g is not None for g in got_grads.values())
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3 if bf16 else 1e-6, atol=0)
    for name, want in want_grads.items():  # the sums' order differs
        assert_close_at_scale(got_grads[name], want, 2e-2 if bf16 else 1e-5, name)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_branches_give_the_fused_loss_and_gradients(small_lora_model, led, p, autocast):
    """The same loss and LoRA gradients as the fused branches of their own, in fp32 and under bf16 autocast.
    With dropout the masks are the same too on the CPU: its generator draws element after element, so one draw
    over the input repeated for q, k and v is the three draws one after another (CUDA's Philox draws differ,
    as random)."""
    grouped = fused_model(small_lora_model, p, grouped=True)
    groups = lora_fused._copies[lora_layers(grouped)[0]].groups
    assert [len(group.members) for group in groups] == [3, 2] * grouped.config.num_hidden_layers
    got = step(grouped, autocast)
    assert led == [3, 2] * grouped.config.num_hidden_layers
    assert_same_step(got, step(fused_model(small_lora_model, p, grouped=False), autocast), bf16=autocast)


def test_on_a_bf16_base_each_forward_plans_its_branches_for_its_own_autocast_state(tiny_model, led, monkeypatch):
    """A bf16 base with fp32 adapters (lora.dtype auto): without autocast peft copies each LoRA input to fp32,
    a path the fused branch leaves to peft; under autocast (a GPU's training) roletune.model tells the layers
    they need not. It tells every layer as the model's forward starts, so that each forward's branches are
    planned for its own autocast state: the first under autocast groups every member (told layer by layer as
    each was called, k and v and up, not yet called when q and gate led, ran branches of their own there), and
    the first after it without autocast (sample answers) copies its inputs to fp32 (it ran the fused branch
    in bf16 there)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
    fuse_lora(model, grouped=True)
    own = []  # the dtypes of the fused branches run on their own
    apply = lora_fused._LoraBranch.apply
    monkeypatch.setattr(lora_fused._LoraBranch, "apply", lambda *args: own.append(args[6]) or apply(*args))
    layers = model.config.num_hidden_layers
    for autocast, groups, branches in [(True, [3, 2], [torch.bfloat16] * 2), (False, [], []),
                                       (True, [3, 2], [torch.bfloat16] * 2)]:
        led.clear()
        own.clear()
        step(model, autocast)
        assert led == groups * layers and own == branches * layers  # o_proj and down_proj lead no group


def test_a_grouped_layer_runs_nine_matmuls_and_six_dropout_draws_fewer(small_lora_model):
    """Per decoder layer, forward and backward with dropout: q, k, v and gate, up draw their masks once a group
    each way (3 draws fewer forward, 3 redraws fewer backward) and run lora_A forward, its gradient and the
    input's as one batched matmul a group (3 + 3 + 3 matmuls fewer). Counted on the CPU under bf16 autocast
    (a draw there is a bernoulli_ and three more operators; on a GPU one kernel)."""
    def count(grouped: bool):
        model = fused_model(small_lora_model, 0.1, grouped)
        step(model, autocast=True)  # the first forward allocates the adapter copies
        model.zero_grad()
        calls = Calls()
        with calls:
            step(model, autocast=True)
        return calls.count

    want, got = count(False), count(True)
    layers = small_lora_model().config.num_hidden_layers
    matmuls = ("mm", "bmm", "addmm")
    # The first layer's q, k and v read hidden states that need no gradient (the embeddings are frozen): neither
    # path runs the input's gradient there, so that group saves 2 matmuls of its 3 fewer.
    assert sum(want[op] for op in matmuls) - sum(got[op] for op in matmuls) == 9 * layers - 2
    # lora_A, its gradient and the input's, for each of the two groups (attention may run batched matmuls of its
    # own, as many on both paths)
    assert got["bmm"] - want["bmm"] == 3 * 2 * layers - 1
    assert want["bernoulli_"] - got["bernoulli_"] == 6 * layers


def test_checkpointed_layers_redraw_the_groups_masks(small_lora_model, led):
    """A checkpointed layer recomputes its forward in backward: its groups draw the same masks again, so the
    gradients are those of the run without checkpointing."""
    want = step(fused_model(small_lora_model, 0.3, grouped=True), autocast=False)
    model = fused_model(small_lora_model, 0.3, grouped=True)
    checkpoint_first_layers(model.get_base_model(), 1)
    led.clear()
    got = step(model, autocast=False)
    assert led == [3, 2] * model.config.num_hidden_layers + [3, 2]  # the first layer's again, in backward
    assert_same_step(got, want, bf16=False)


def test_a_sibling_called_on_another_tensor_runs_its_own_branch(small_lora_model, led):
    """q, k and v called on two tensors, outside a model forward (no plans, no adapter copies): each output and
    every gradient is the fused branches' (the products made for siblings that never take them go unused,
    their gradients zero)."""
    def run(grouped: bool):
        model = fused_model(small_lora_model, 0.0, grouped).train()
        attention = model.base_model.model.model.layers[0].self_attn
        torch.manual_seed(3)
        x, other = (torch.randn(1, 5, attention.q_proj.in_features, requires_grad=True) for _ in range(2))
        outs = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)]
        sum((out * torch.randn_like(out)).sum() for out in outs).backward()
        grads = {name: p.grad for name, p in attention.named_parameters() if p.requires_grad}
        return outs, grads, x.grad, other.grad

    got = run(True)
    assert led == [3, 3, 3]  # each led: what was left pending was for the other tensor
    want = run(False)
    for got_out, want_out in zip(got[0], want[0]):
        torch.testing.assert_close(got_out, want_out)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], msg=name)
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
def test_the_shared_products_differentiate_through_each_members_mask(monkeypatch, kernel, capturing):
    """SharedInput's own backward (the masks redrawn from the RNG state, or kept as a CUDA graph recording keeps
    them) against autograd through x * mask_i @ A_i^T with the masks it drew. kernel: the fused dropout kernel's
    bool masks (a GPU's; run here on the CPU), else the CPU's float noise."""
    if kernel:
        monkeypatch.setattr(lora_fused, "FUSED_DROPOUT_DEVICES", {"cpu"})
    monkeypatch.setattr(graphs, "_capturing", capturing)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weights = [torch.randn(4, 16, requires_grad=True) for _ in range(3)]
    grads = [torch.randn(10, 4) for _ in range(3)]
    state = torch.get_rng_state()
    outs = lora_grouped.SharedInput.apply(x, torch.stack(weights).detach(), 0.25, torch.float32, *weights)
    torch.autograd.backward(outs, grads)
    drawn_next = torch.rand(3)
    torch.set_rng_state(state)
    each = torch.ones(3, 10, 16)
    noise = torch.native_dropout(each, 0.25, True)[0] if kernel else torch.empty_like(each).bernoulli_(0.75).div_(0.75)
    assert capturing or torch.equal(torch.rand(3), drawn_next)  # the redraw left the stream where it was
    x2, *weights2 = (t.detach().requires_grad_() for t in (x, *weights))
    want = [(x2.reshape(10, 16) * noise[i]) @ weights2[i].t() for i in range(3)]
    torch.autograd.backward(want, grads)
    for got_out, want_out in zip(outs, want):
        torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(x.grad, x2.grad)
    for got_weight, want_weight in zip(weights, weights2):
        torch.testing.assert_close(got_weight.grad, want_weight.grad)


@pytest.mark.slow
def test_a_grouped_run_trains_the_fused_runs_adapter(short_run):
    """`lora.grouped: true` end to end, with dropout: on the CPU the same masks, so the same losses, gradient norms
    and adapter as the default run."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}
    want, want_log = short_run("fused", shared=True, lora=lora)
    got, got_log = short_run("grouped", lora={**lora, "grouped": True})
    assert got_log == pytest.approx(want_log, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
