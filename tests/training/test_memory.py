"""The memory estimate against measured GPU peaks and against what autograd keeps, the largest micro-batch
of Trainer's order, and the gradient_checkpointing=auto decision they drive: how many layers to checkpoint."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from roletune import train
from roletune.config import LoraConfig, config_from_dict, load_config
from roletune.data.tokenize import Example
from roletune.errors import ConfigError
from roletune.training import memory

GiB = 2**30
# The seed's LoRA as peft runs it by default (as the measured peer did): seven projections, fp32 input copies.
SEED_LORA = LoraConfig(r=8, dropout=0.1, dtype="fp32", recompute_dropout=False)


@pytest.fixture(scope="module")
def qwen7b(shared):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(shared / "models" / "qwen2.5-7b-instruct")


# Peaks measured on an H200 (torch.cuda.max_memory_allocated) for the seed recipe: Qwen2.5-7B in bf16 on the
# huanhuan data, padded batches, HF Trainer + peft LoRA r=8 on seven projections, dropout 0.1, logits over all
# positions. The largest padded batch is batch x 249 tokens (the longest tokenized example).
@pytest.mark.parametrize("batch, checkpointed_layers, measured_gib", [(4, 28, 16.5), (16, 0, 51.7)])
def test_estimate_reproduces_the_measured_h200_peaks(qwen7b, batch, checkpointed_layers, measured_gib):
    tokens = batch * 249
    peak = memory.estimate(qwen7b, SEED_LORA, torch.bfloat16, tokens, tokens, checkpointed_layers).peak
    # Within 5%: the estimate lands within 1% of both, and a drift past 5% means the model of what
    # transformers / peft keep for backward has gone stale.
    assert peak / GiB == pytest.approx(measured_gib, rel=0.05)


def test_parameter_counts_are_the_meta_models(qwen7b, tiny_model):
    from roletune.config import ModelConfig
    from roletune.model import apply_lora, build_meta_model, load_model_config

    assert memory.Shape.of(qwen7b).parameters() == 7_615_616_512  # 7,635,801,600 all - 20,185,088 LoRA
    seed = memory.estimate(qwen7b, SEED_LORA, torch.bfloat16, 1, 1, 0)
    assert seed.adapter == 20_185_088 * memory.ADAPTER_TRAINING_BYTES
    assert seed.weights == 7_615_616_512 * 2
    lora = LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    meta = apply_lora(build_meta_model(ModelConfig(path=str(tiny_model))), lora)
    trainable, total = meta.get_nb_trainable_parameters()
    tiny = memory.estimate(load_model_config(ModelConfig(path=str(tiny_model))), lora, torch.float32, 1, 1, 0)
    assert (tiny.adapter // memory.ADAPTER_TRAINING_BYTES, tiny.weights // 4) == (trainable, total - trainable)


def test_the_counted_activations_are_what_autograd_keeps(saved_bytes):
    """Bytes autograd saves in a forward pass of a small Qwen2 + LoRA under bf16 autocast (as Trainer runs on
    a GPU), against the estimate's kept activations. Dropout is off: the CPU keeps a float dropout mask
    where CUDA keeps a 1-byte one, so only the dropout-free layout reads the same on both."""
    import peft
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    lora = LoraConfig(r=8, dropout=0.0, dtype="fp32")  # peft's own path, which copies inputs to fp32
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=lora.target_modules))
    lengths = [100, 60, 40]  # one packed row, position ids restarting per example
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, config.vocab_size, positions.shape)
    decoder = model.base_model.model.model  # the layers and the final norm; the loss is counted apart

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            decoder(input_ids=ids, position_ids=positions, use_cache=False)
    estimated = memory.estimate(config, lora, torch.bfloat16, sum(lengths), 0, 0).kept_activations
    # The CPU's sdpa adds a float copy of the T x T mask per layer (about 3% here).
    assert saved_bytes(model, forward) == pytest.approx(estimated, rel=0.06)


def test_graphed_layers_keep_a_dropout_mask_per_projection_as_estimated(saved_bytes, monkeypatch):
    """train.cuda_graphs: while a graph of the layers is recorded, the fused LoRA branch keeps its dropout mask
    instead of redrawing it (roletune.speed.layer_graphs): one mask element per input element of every adapted
    projection, a bit each where the mask is the fused kernel's bool one (a GPU's, run here on the CPU), the
    CPU's own noise in the input's dtype (bf16) otherwise."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from roletune.speed import graphs, lora_fused
    from roletune.speed.levers import add_lora
    from roletune.speed.lora_fused import fuse_lora_layers

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    lora = LoraConfig(r=8, dropout=0.1)
    model = add_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa"),
                       lora)
    fuse_lora_layers(model)
    model.train()
    tokens = 120
    ids = torch.randint(0, config.vocab_size, (1, tokens))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.base_model.model.model(input_ids=ids, use_cache=False)
    eager = saved_bytes(model, forward)
    monkeypatch.setattr(graphs, "_capturing", True)
    graphed = saved_bytes(model, forward)
    inputs = sum(i for i, _ in memory.Shape.of(config).linears().values())  # the seven projections' input widths
    assert graphed - eager == config.num_hidden_layers * tokens * inputs * 2  # bf16 noise on the CPU
    monkeypatch.setattr(lora_fused, "FUSED_DROPOUT_DEVICES", {"cpu"})  # the bool masks of CUDA's kernel
    packed = saved_bytes(model, forward) - eager
    assert packed == config.num_hidden_layers * tokens * inputs // 8
    per_token = [memory.estimate(config, lora, torch.bfloat16, 1, 0, 0, graphed=g).kept_activations
                 for g in (False, True)]
    assert per_token[1] - per_token[0] == config.num_hidden_layers * inputs // 8


@pytest.mark.slow
def test_compiled_layers_keep_no_more_than_the_estimate(saved_bytes):
    """train.compile=layers: torch.compile decides what a compiled layer keeps for backward (it may recompute
    cheap elementwise results instead), so the estimate, made for roletune's eager layers, must stay an upper
    bound, or automatic checkpointing would plan too little for a compiled run."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from roletune.speed.compiled_layers import compile_decoder_layers
    from roletune.speed.lean_activations import make_lean
    from roletune.speed.levers import add_lora
    from roletune.speed.lora_fused import fuse_lora_layers

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    lora = LoraConfig(r=8, dropout=0.0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    make_lean(base)
    model = add_lora(base, lora)
    fuse_lora_layers(model)
    assert compile_decoder_layers(model) == 2
    model.train()
    lengths = [100, 60, 40]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    decoder = model.base_model.model.model

    def forward():
        embeds = decoder.embed_tokens(torch.randint(0, config.vocab_size, positions.shape)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    forward()  # compiles
    kept = saved_bytes(model, forward)
    estimated = memory.estimate(config, lora, torch.bfloat16, sum(lengths), 0, 0).kept_activations
    assert 0 < kept <= estimated, (kept, estimated)


def test_more_tokens_or_a_bigger_batch_need_more_and_checkpointing_less(qwen7b):
    def peak(tokens, positions, checkpointed_layers):
        return memory.estimate(qwen7b, SEED_LORA, torch.bfloat16, tokens, positions, checkpointed_layers).peak

    for layers in (28, 5, 0):
        peaks = [peak(tokens, tokens // 3, layers) for tokens in (64, 256, 1024, 4096)]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4
        assert peak(1024, 1024, layers) > peak(1024, 300, layers)
    for tokens in (256, 1024, 4096):
        assert peak(tokens, tokens // 3, 28) < peak(tokens, tokens // 3, 5) < peak(tokens, tokens // 3, 0)
    examples = [Example(list(range(n)), [-100] * (n // 2) + list(range(n - n // 2))) for n in (30, 80, 50, 120, 10)]

    def bound(batch, packing, reply_logits_only=True):
        largest = memory.largest_possible_microbatch(examples, batch, packing, reply_logits_only)
        return largest.tokens, largest.positions

    for packing in (True, False):
        sizes = [bound(batch, packing) for batch in (1, 2, 3, 5)]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert bound(2, True) == (200, 60 + 40)  # the two longest, their labels
    assert bound(2, False, False) == (240, 240)  # two rows of 120, all logits


def test_quantized_weights_are_smaller(qwen7b):
    def weights(quantization):
        return memory.estimate(qwen7b, SEED_LORA, torch.bfloat16, 512, 128, 28, quantization).weights

    assert weights("4bit") < weights("8bit") < weights(None)
    assert weights(None) - weights("4bit") > 8.5 * GiB  # 6.5 B decoder weights from 2 bytes to 0.5625: 8.7 GiB
    with pytest.raises(ValueError, match="quantization"):
        weights("3bit")


def run_config(tiny_model, **train):
    return config_from_dict({"model": {"path": str(tiny_model)}, "data": {"path": "unused.json"},
                             "train": {"batch_size": 4, **train}})


def examples(count=8, length=40):
    return [Example(list(range(length)), [-100] * 10 + list(range(length - 10))) for _ in range(count)]


def test_auto_turns_checkpointing_on_exactly_past_the_budget(qwen7b, tiny_model):
    cfg = run_config(tiny_model)
    planned = memory.for_run(cfg, examples(), torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True)
    without_gib = planned.without.peak / GiB
    for budget, expected in [(without_gib / 0.9 * 1.01, False), (without_gib / 0.9 * 0.99, True)]:
        cfg = run_config(tiny_model, memory_budget_gib=budget)
        decision = memory.for_run(cfg, examples(), torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True)
        assert decision.checkpointing is expected, decision.line()
    assert decision.line().startswith(f"gradient checkpointing: {decision.layers} of 28 layers (estimated peak")
    assert decision.estimate is decision.estimates[decision.layers] and decision.estimate.peak <= decision.usable


def test_auto_reads_the_gpus_total_memory(qwen7b, tiny_model, monkeypatch):
    card = {"total_memory": 80 * GiB}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(**card))
    gpu = torch.device("cuda", 0)
    # 8 x 40 packed tokens of the 7B model: about 18 GiB without checkpointing.
    assert not memory.for_run(run_config(tiny_model), examples(), gpu, torch.bfloat16, qwen7b).checkpointing
    card["total_memory"] = 16 * GiB
    decision = memory.for_run(run_config(tiny_model), examples(), gpu, torch.bfloat16, qwen7b)
    assert decision.checkpointing and decision.usable == round(16 * GiB * 0.9)
    # A budget larger than the card is capped by the card.
    assert memory.for_run(run_config(tiny_model, memory_budget_gib=200), examples(), gpu, torch.bfloat16,
                          qwen7b).usable == round(16 * GiB * 0.9)


def test_explicit_settings_win_and_the_cpu_never_checkpoints_on_its_own(qwen7b, tiny_model):
    cpu = torch.device("cpu")
    tight = dict(memory_budget_gib=0.01)
    assert not memory.for_run(run_config(tiny_model, **tight), examples(), cpu, torch.bfloat16, qwen7b).checkpointing
    assert memory.for_run(run_config(tiny_model, gradient_checkpointing=True), examples(), cpu, torch.float32,
                          qwen7b).checkpointing
    assert not memory.for_run(run_config(tiny_model, gradient_checkpointing=False, **tight), examples(), cpu,
                              torch.bfloat16, qwen7b, on_gpu=True).checkpointing


def test_a_cpu_run_with_a_tiny_budget_trains_without_checkpointing(config_file, capsys):
    cfg = load_config(config_file(train={"max_steps": 1, "memory_budget_gib": 0.001}))
    train.run(cfg)
    out = capsys.readouterr().out
    assert "gradient checkpointing: off (auto never checkpoints on the CPU" in out
    summary = json.loads((Path(cfg.output_dir) / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["gradient_checkpointing"] is False and summary["estimated_peak_gib"] > 0
    assert (summary["checkpointed_layers"], summary["decoder_layers"]) == (0, 2)
    assert "gradient_checkpointing: auto" in (Path(cfg.output_dir) / "roletune.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_checkpointing_leaves_the_result_unchanged(config_file, tmp_path):
    """Non-reentrant checkpointing replays the RNG state: the same dropout masks, the same adapter.
    So a resumed run may decide auto differently (another GPU) and still continue the same training."""
    from safetensors.torch import load_file

    adapters = []
    for checkpointing in (True, False):
        cfg = load_config(config_file(train={"max_steps": 3, "gradient_checkpointing": checkpointing},
                                      lora={"dropout": 0.1}, output_dir=str(tmp_path / str(checkpointing))))
        train.run(cfg, echo=lambda *_: None)
        adapters.append(load_file(Path(cfg.output_dir) / "adapter_model.safetensors"))
        summary = json.loads((Path(cfg.output_dir) / "train_summary.json").read_text(encoding="utf-8"))
        assert summary["gradient_checkpointing"] is checkpointing
        assert summary["checkpointed_layers"] == (2 if checkpointing else 0)
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], rtol=0, atol=1e-6, msg=name)


def test_dry_run_plans_for_a_budget(shared, capsys):
    from roletune.cli import main

    root = Path(__file__).resolve().parents[2]
    assert main(["train", str(root / "configs" / "huanhuan-qwen2.5-7b.yaml"), "--dry-run",
                 f"model.path={shared}/models/qwen2.5-7b-instruct", f"model.tokenizer={shared}/tokenizers/qwen2.5",
                 f"data.path={shared}/data/huanhuan.json", "train.gradient_checkpointing=auto",
                 "train.batch_size=16", "train.memory_budget_gib=24"]) == 0
    out = capsys.readouterr().out
    assert "memory (estimated, bf16 on a GPU with 21.6 GiB usable)" in out
    assert "  for the largest micro-batch of this run's data order: " in out
    layers = re.search(r"gradient checkpointing: (\d+) of 28 layers \(estimated peak [\d.]+ GiB of 21.6 GiB usable; "
                       r"[\d.]+ GiB with none\)", out)
    assert layers and 0 < int(layers[1]) < 28, out[-1500:]


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (True, True), (False, False), ("on", True),
                                             ("off", False), ("true", True)])
def test_gradient_checkpointing_accepts_auto_and_booleans(value, expected):
    # Overrides are read as YAML: on/off/true are booleans there.
    cfg = config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}},
                           [f"train.gradient_checkpointing={value if isinstance(value, str) else str(value).lower()}"])
    assert cfg.train.gradient_checkpointing == expected
    assert config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}}).train.gradient_checkpointing == "auto"


@pytest.mark.parametrize("value", ["sometimes", 2, [True], "yes please"])
def test_gradient_checkpointing_rejects_anything_else(value):
    with pytest.raises(ConfigError, match="train.gradient_checkpointing=.*expected"):
        config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}, "train": {"gradient_checkpointing": value}})
    with pytest.raises(ConfigError, match="train.memory_budget_gib=-1.0: must be > 0"):
        config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}}, ["train.memory_budget_gib=-1"])


def test_the_run_estimate_follows_the_quantization_and_the_chunked_head(qwen7b, tiny_model):
    def planned(model=None, **train):
        cfg = run_config(tiny_model, **train)
        if model:
            cfg = config_from_dict({**cfg_dict(cfg), "model": {"path": str(tiny_model), **model}})
        return memory.for_run(cfg, examples(16, 300), torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True).without

    full, chunked = planned(lm_head_loss="full"), planned(lm_head_loss="chunked", loss_chunk=256)
    assert chunked.logits == 256 * qwen7b.vocab_size * memory.LOGIT_BYTES < full.logits
    assert planned(model={"quantization": "4bit"}).weights < planned().weights


def cfg_dict(cfg) -> dict:
    import yaml

    from roletune.config import dump_config
    return yaml.safe_load(dump_config(cfg))


def test_the_checkpointed_layer_count_grows_as_the_budget_shrinks(qwen7b, tiny_model):
    """Each estimate is the module docstring's sum for k of 28 layers, and auto takes the fewest that fit."""
    cfg = run_config(tiny_model)
    decision = memory.for_run(cfg, examples(16, 300), torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True)
    tokens, every = decision.microbatch.tokens, 28
    shape = memory.Shape.of(qwen7b)
    targets = {name: dims for name, dims in shape.linears().items() if name in memory.adapted_modules(cfg.lora)}
    lean = cfg.train.lean_activations
    full = memory.layer_activation_bytes(shape, targets, 2, cfg.lora, lean)
    for k, estimate in enumerate(decision.estimates):
        kept = tokens * (k * shape.hidden * 2 + (every - k) * full + memory.norm_bytes(shape, 2, lean))
        loss = max(estimate.logits, tokens * full if k else 0)
        assert estimate.peak == estimate.weights + estimate.adapter + kept + loss + memory.WORKSPACE_BYTES, k
    peaks = [e.peak for e in decision.estimates]
    assert peaks[1:] == sorted(peaks[1:], reverse=True)  # every further layer checkpointed saves memory

    usable_range = torch.linspace(peaks[0] * 1.02, peaks[-1] * 0.98, 400).tolist()
    counts = [memory.decide("auto", decision.estimates, round(usable), True, decision.microbatch).layers
              for usable in usable_range]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == every
    assert len(set(counts)) == every + 1  # each count from 0 to 28 is the answer for some budget
    for usable, k in zip(usable_range, counts):
        fits = [e.peak <= usable for e in decision.estimates]
        assert k == (fits.index(True) if any(fits) else every)
    assert memory.decide(True, decision.estimates, None, False, decision.microbatch).layers == every
    assert memory.decide(False, decision.estimates, 1, True, decision.microbatch).layers == 0
    tight = memory.decide("auto", decision.estimates, round(peaks[-1] * 0.98), True, decision.microbatch)
    assert "28 of 28 layers (estimated peak" in tight.line() and "it may run out of memory" in tight.line()


VARIED_ROWS = [{"instruction": f"第{i}个问题：灯塔还亮着吗？" + "海上起雾了。" * (i % 4), "input": "",
                "output": "灯塔照常亮着。" * (1 + i * 7 % 5)} for i in range(13)]


@pytest.mark.slow
@pytest.mark.parametrize("packing, train_settings", [(True, {"epochs": 2, "grad_accum": 2}),
                                                     (False, {"max_steps": 5, "grad_accum": 1})])
def test_the_largest_microbatch_is_the_largest_trainer_trains_on(config_file, packing, train_settings):
    """The micro-batches a real Trainer trains on, in order, are the ones epoch_order.training_order plans:
    so the planned largest is never exceeded and is reached."""
    from roletune.model import load_tokenizer
    from roletune.training.batching import labelled_positions
    from roletune.training.epoch_order import training_order
    from roletune.training.trainer import build_trainer

    cfg = load_config(config_file(VARIED_ROWS, train={"batch_size": 4, "packing": packing, "save_steps": 1000,
                                                      **train_settings}))
    tokenizer = load_tokenizer(cfg.model)
    data = train.build_dataset(cfg, tokenizer)
    model = train.build_model(cfg, torch.device("cpu"), echo=lambda *_: None)
    trainer = build_trainer(cfg, model, tokenizer, data.train, [], torch.device("cpu"))
    seen = []
    step = trainer.training_step

    def recording(model, inputs, *args, **kwargs):
        labels = inputs["labels"]
        positions = (labels[:, 1:] != -100).sum() if packing else labels.shape[0] * len(labelled_positions(labels))
        seen.append((inputs["input_ids"].numel(), int(positions)))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = recording
    trainer.train()

    t = cfg.train
    order = training_order(len(data.train), t.batch_size, 1, t.seed, t.grad_accum, t.epochs, t.max_steps)
    planned = [memory.worst_microbatch(data.train, [batch], packing, True) for batch in order]
    assert [(m.tokens, m.positions) for m in planned] == seen
    largest = memory.planned_microbatch(cfg, data.train, world_size=1)
    assert largest.in_order and (largest.tokens, largest.positions) == tuple(map(max, zip(*seen)))
    bound = memory.largest_possible_microbatch(data.train, t.batch_size, packing, True)
    assert largest.tokens <= bound.tokens and largest.positions <= bound.positions  # the 4 longest together


def test_several_processes_deal_the_padded_order_one_microbatch_each():
    """accelerate's own shards of EvenTailTrainer's padded order, epoch by epoch, are the planned micro-batches."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from roletune.training import epoch_order

    for count, per_device, ranks, grad_accum, epochs in [(10, 2, 2, 1, 2), (7, 2, 3, 2, 3), (5, 4, 2, 1, 1.0)]:
        dealt = []
        for epoch in range(int(epochs)):
            def padded():  # what each rank builds for itself
                order = epoch_order.seeded_order(range(count), seed=3)
                order.set_epoch(epoch)
                return epoch_order.PaddedOrder(order, per_device * ranks, filler=count)

            shards = [list(BatchSamplerShard(BatchSampler(padded(), per_device, False), ranks, rank))
                      for rank in range(ranks)]
            dealt += [shard[i] for i in range(len(shards[0])) for shard in shards]  # round by round
        assert epoch_order.training_order(count, per_device, ranks, 3, grad_accum, epochs, None) == dealt


@pytest.mark.slow
def test_one_of_two_layers_checkpointed_trains_the_same_and_only_that_layer_recomputes(config_file, tmp_path):
    """The first layer is checkpointed, the second is not: same losses and adapter as no checkpointing (the
    recomputation replays dropout's RNG), and during training the first layer's MLP runs twice per micro-batch
    (forward, then again in backward) while the second's runs once."""
    from roletune.model import load_tokenizer
    from roletune.training.trainer import build_trainer

    def trained(checkpointed_layers):
        cfg = load_config(config_file(train={"max_steps": 3, "save_steps": 1000}, lora={"dropout": 0.1},
                                      output_dir=str(tmp_path / str(checkpointed_layers))))
        tokenizer = load_tokenizer(cfg.model)
        data = train.build_dataset(cfg, tokenizer)
        model = train.build_model(cfg, torch.device("cpu"), lambda *_: None, checkpointed_layers)
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i < checkpointed_layers for i in range(2)]
        calls = [0] * len(layers)
        # Counted as the MLP is entered: a hook on the layer itself sits outside its checkpoint, and the recompute
        # stops (early) inside the MLP's last projection, before any hook after the MLP's forward would run.
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        trainer = build_trainer(cfg, model, tokenizer, data.train, [], torch.device("cpu"))
        trainer.train()
        assert [layer.gradient_checkpointing for layer in layers] == [i < checkpointed_layers for i in range(2)]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return calls, losses, adapter

    plain_calls, plain_losses, plain = trained(0)
    calls, losses, adapter = trained(1)
    assert plain_calls == [3, 3] and calls == [6, 3]  # 3 micro-batches
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(adapter[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_an_order_not_modelled_falls_back_to_the_longest_examples_and_says_so(qwen7b, tiny_model, monkeypatch):
    from transformers import TrainingArguments

    varied = [Example(list(range(n)), [-100] * 5 + list(range(n - 5))) for n in (20, 90, 40, 60, 30, 80, 50, 70)]
    cfg = run_config(tiny_model, memory_budget_gib=24)
    ordered = memory.for_run(cfg, varied, torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True)
    monkeypatch.setattr(TrainingArguments, "train_sampling_strategy", "group_by_length")
    bounded = memory.for_run(cfg, varied, torch.device("cpu"), torch.bfloat16, qwen7b, on_gpu=True)
    assert ordered.microbatch.in_order and not bounded.microbatch.in_order
    assert bounded.microbatch.tokens == 90 + 80 + 70 + 60 >= ordered.microbatch.tokens
    assert "data order not modelled" in bounded.line() and "data order" not in ordered.line()


def test_recomputed_lora_dropout_keeps_each_input_once(qwen7b):
    """The seed's LoRA as peft runs it keeps a copy of the input per projection; roletune's default keeps
    the attention input, the attention output, the MLP input and the MLP's inner activation once each."""
    h, inner = qwen7b.hidden_size, qwen7b.intermediate_size

    def per_token_layer(lora):
        return memory.estimate(qwen7b, lora, torch.bfloat16, 1, 0, 0).kept_activations // 28

    peft_default, roletune = per_token_layer(SEED_LORA), per_token_layer(LoraConfig(r=8, dropout=0.1))
    assert peft_default - roletune == (6 * h + inner) * 3 - (3 * h + inner) * 2
    assert roletune / peft_default < 0.8  # a fifth and more of what a layer keeps
    assert per_token_layer(LoraConfig(r=8, dropout=0.1, recompute_dropout=False)) == peft_default
