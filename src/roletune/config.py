"""The configuration schema: nested dataclasses are the one source of defaults and documentation.

A YAML file supplies values, dotted overrides from the command line go on top
(`train.lr=2e-4`), and everything is checked once, at load: unknown keys, wrong types and
bad values are reported together in one ConfigError.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from roletune.errors import ConfigError

SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setting(default, help: str, *, choices=None, check=None, factory=None):
    """A schema field with its documentation, allowed values and a value check (predicate, message)."""
    meta = {"help": help, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")


@dataclass
class ModelConfig:
    path: str = setting("", "Base model: a local folder, a Hugging Face hub id, or modelscope:ID.")
    tokenizer: str | None = setting(None, "Tokenizer location, same forms as model.path; defaults to model.path.")
    device: str = setting("auto", "auto (first visible GPU, else CPU), cpu, cuda, or cuda:N to train on exactly GPU N.")
    dtype: str = setting(
        "auto", "Weights dtype. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.",
        choices=["auto", "bf16", "fp16", "fp32"])
    quantization: str = setting(
        "none", "Load the frozen base quantised with bitsandbytes (QLoRA): 4bit is NF4 with double quantisation, "
        "computing in model.dtype; 8bit is LLM.int8. Needs pip install roletune[qlora]. chat and compare load the "
        "base as training did; merge always folds the adapter into the unquantised base.",
        choices=["none", "4bit", "8bit"])
    attn_implementation: str = setting(
        "auto", "Attention kernel. auto: varlen for packed training where PyTorch's varlen flash kernel runs "
        "(checked on the GPU before training), else sdpa; varlen, sdpa, eager, flash_attention_2 (needs the "
        "flash-attn package): that one.", choices=["auto", "varlen", "sdpa", "eager", "flash_attention_2"])
    trust_remote_code: bool = setting(False, "Run Python code shipped with the model repository. Off unless you trust it.")
    revision: str | None = setting(None, "Hub branch, tag or commit of the model.")
    allow_pickle: bool = setting(
        False, "Load pickle weights (pytorch_model.bin, adapter_model.bin) when there is no safetensors file. "
        "Unpickling can run code: only for files you trust.")


@dataclass
class DataConfig:
    path: str = setting("", "Training data: a local .json/.jsonl file, an http(s) URL, or a hub dataset id.")
    format: str = setting(
        "auto", "Record layout; auto detects it from the first record.",
        choices=["auto", "alpaca", "sharegpt", "messages"])
    system_prompt: str | None = setting(
        None, "System prompt for records without their own; saved with the run and reused by chat.")
    max_length: int = setting(1024, "Tokens per example; longer examples are truncated on the right.", check=POSITIVE)
    train_on: str = setting(
        "assistant", "Which tokens carry loss: every assistant turn, the last assistant turn, or all tokens.",
        choices=["assistant", "last", "all"])
    split: str = setting("train", "Split to read when data.path is a hub dataset.")
    strict: bool = setting(
        False, "Refuse the whole file for a record with an empty prompt (instruction and input both empty), "
        "instead of leaving it out with a warning. A record without a reply is refused either way.")
    eval_size: float = setting(
        0, "Rows held out from training for eval loss, sample answers and `roletune eval`: "
        "a count (>= 1) or a fraction (< 1); drawn with train.seed and saved with the run.",
        check=(lambda v: v >= 0 and (v < 1 or v == int(v)), "must be a whole count >= 1 or a fraction in [0, 1)"))


@dataclass
class LoraConfig:
    r: int = setting(8, "LoRA rank.", check=POSITIVE)
    alpha: float = setting(32.0, "LoRA alpha; the update is scaled by alpha / r.", check=POSITIVE)
    dropout: float = setting(0.1, "Dropout on the LoRA input.", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    target_modules: list[str] = setting(
        None, "Module names that get adapters (the seed's seven projections by default), or all-linear.",
        factory=lambda: list(SEED_TARGET_MODULES))
    dtype: str = setting(
        "auto", "Adapter weights. auto: fp32 weights for the optimizer, while under bf16/fp16 mixed precision (GPU "
        "training) the LoRA matmuls take the activations as they are instead of an fp32 copy of them; fp32: "
        "also copy the activations to fp32 in every LoRA layer (peft's default); bf16: bf16 weights and optimizer "
        "updates (needs a bf16 base), the least memory but updates are rounded to bf16.",
        choices=["auto", "fp32", "bf16"])
    recompute_dropout: bool = setting(
        True, "Redraw each LoRA layer's dropout in backward instead of keeping a dropped-out copy of its input per "
        "adapted projection: the same masks and gradients, about a fifth less activation memory with the seed's LoRA. "
        "Applies with lora.dtype auto or bf16 (fp32 copies the input per layer anyway).")
    fused: bool = setting(
        True, "Run each adapted projection's LoRA branch (dropout, both matmuls, scaling, the add) as one autograd "
        "function: peft's masks and gradients from fewer kernel launches and autograd nodes. Applies in training "
        "with lora.dtype auto or bf16 and the dropout redrawn (or 0); not with train.distributed fsdp or deepspeed.")
    grouped: bool = setting(
        False, "With lora.fused, the projections that read one input (q/k/v, gate/up) draw their dropout masks as "
        "one tensor and run their lora_A matmuls as one batched matmul, forward and backward: fewer kernel "
        "launches. The masks are as random but drawn differently from peft's on a GPU; off until measured there.")


@dataclass
class TrainConfig:
    epochs: float = setting(3.0, "Passes over the data (ignored when max_steps is set).", check=POSITIVE)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps; overrides epochs.", check=POSITIVE)
    lr: float = setting(1e-4, "Peak learning rate.", check=POSITIVE)
    lr_scheduler: str = setting(
        "linear", "Learning-rate schedule (a transformers scheduler name).",
        choices=["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"])
    warmup: float = setting(0.0, "Warmup: a fraction of all steps if < 1, else a number of steps.", check=NON_NEGATIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay.", check=NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", check=POSITIVE)
    batch_size: int = setting(4, "Examples per micro-batch on each device.", check=POSITIVE)
    grad_accum: int = setting(4, "Micro-batches per optimizer step.", check=POSITIVE)
    effective_batch: int | None = setting(
        None, "Examples per optimizer step over all processes; when set, grad_accum is derived from it as "
        "effective_batch / (batch_size x processes), which must divide exactly.", check=POSITIVE)
    gradient_checkpointing: bool | str = setting(
        "auto", "Recompute activations in backward, per decoder layer: a checkpointed layer keeps only its input, "
        "and costs another forward pass through it (all layers: about a third more compute). auto: the fewest "
        "layers (the first ones) for which the estimated peak of this run's largest micro-batch fits 90% of the "
        "GPU's memory (or of train.memory_budget_gib), none when it fits without; never on the CPU. "
        "true: all layers; false: none.", choices=["auto", True, False])
    memory_budget_gib: float | None = setting(
        None, "GPU memory to plan for, in GiB, instead of the GPU's own (e.g. 24 to fit a 24 GiB card): "
        "gradient_checkpointing=auto decides against 90% of it, and a dry run plans for a GPU of this size.",
        check=POSITIVE)
    packing: bool = setting(
        True, "Padding-free micro-batches: examples concatenated with position ids restarting per example.")
    reply_logits_only: bool = setting(
        True, "Compute the LM head only where a label is (a third of the positions in short role-play data).")
    lm_head_loss: str = setting(
        "auto", "With reply_logits_only, how the LM head + loss run at the trained positions. chunked: loss_chunk "
        "positions at a time, recomputed in backward, so their 152k-wide logits never exist all at once; "
        "auto: Liger-Kernel's fused kernel on a GPU when liger-kernel is installed (pip install roletune[gpu]), "
        "else chunked, and full in FSDP/DeepSpeed runs; full: all their logits at once.",
        choices=["auto", "chunked", "full"])
    loss_chunk: int = setting(1024, "Positions per chunk of the chunked LM-head loss.", check=POSITIVE)
    lean_activations: bool = setting(
        True, "RMSNorm and SwiGLU keep only their inputs for backward and rebuild the rest (Liger-Kernel's trick, in "
        "plain PyTorch): the same outputs, gradients equal within rounding, about a fifth less activation memory for "
        "Qwen2 / Qwen3 / Llama / Mistral layers.")
    liger_kernels: str | bool = setting(
        "auto", "auto: on a GPU with liger-kernel installed (pip install roletune[gpu]), the decoder layers' RMSNorm, "
        "SwiGLU and RoPE run as Liger-Kernel's Triton kernels, one or two kernels each where PyTorch launches up to "
        "fourteen; each is checked against PyTorch on the model's shapes before training, and one that fails or "
        "differs is left out (so are all with train.compile). false: PyTorch's.", choices=["auto", False])
    compile: bool | str = setting(
        False, "torch.compile. layers: each decoder layer on its own, with dynamic sequence lengths (the layers "
        "share their compiled code, and packed micro-batches of new lengths reuse it; checkpointed layers stay "
        "eager); true: the whole model through Trainer's torch_compile (all of it traced, and new lengths may "
        "recompile). Off by default: measure with benchmarks/train_speed.py --compile before relying on it.",
        choices=[False, True, "layers"])
    compile_mode: str = setting(
        "default", "torch.compile's mode, with train.compile on. reduce-overhead: also CUDA graphs (on a GPU each "
        "compiled layer's kernels are recorded once per input length and then replayed by one launch each, where "
        "launching them one by one from Python can cost more than running them); packed micro-batches are then "
        "padded with a trailing example of no labels to a multiple of 64 tokens, so that few lengths recur, and a "
        "step must be one micro-batch (train.grad_accum=1). "
        "max-autotune: also tries kernel configurations while compiling (longer), with CUDA graphs; "
        "max-autotune-no-cudagraphs: without.",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    cuda_graphs: bool = setting(
        False, "Replay the decoder layers' forward and backward from CUDA graphs, recorded once per micro-batch "
        "length (no torch.compile): the host launches two graphs a micro-batch instead of thousands of kernels. "
        "Packed micro-batches are padded to a multiple of 64 tokens; LoRA dropout keeps its masks (8 elements a "
        "byte with lora.fused). Needs a GPU, one process, varlen attention and no checkpointed layer, else the "
        "layers run one by one, saying why. Off by default: measure with benchmarks/graph_check.py and "
        "benchmarks/train_speed.py --cuda-graphs before relying on it.")
    optim: str = setting(
        "adamw_torch_fused", "Optimizer (a transformers optimizer name). The default is transformers' own on torch "
        "2.8 and later: AdamW updating all the adapter's tensors in one fused operation; adamw_torch is the same "
        "update as a dozen multi-tensor kernels per step.")
    logging_steps: int = setting(10, "Log the loss every N optimizer steps.", check=POSITIVE)
    save_steps: int = setting(100, "Write a resumable checkpoint every N optimizer steps.", check=POSITIVE)
    save_total_limit: int | None = setting(None, "Keep only the newest N checkpoints.", check=POSITIVE)
    seed: int = setting(42, "Seed for LoRA init, dropout, data order and the held-out split.")
    on_nonfinite: str = setting(
        "stop", "A NaN/inf loss or gradient norm: stop (naming the step, keeping the last good checkpoint) "
        "or skip that optimizer step. (With fp16 weights the loss scaler already skips overflowing steps.)",
        choices=["stop", "skip"])
    run_ahead: bool = setting(
        True, "The host queues each step while the GPU still computes the one before: batches are copied from "
        "pinned memory without waiting, and the on_nonfinite check is made on the GPU (the fused optimizer skips a "
        "bad step's update there) and read on the host a step later, or at the next log, checkpoint or eval. false: "
        "the host waits for every step's check before its update, as it always does with a non-fused optimizer "
        "or in FSDP/DeepSpeed runs.")
    report_to: str = setting(
        "swanlab", "Tracker: swanlab (cloud when logged in, else a local run under output_dir/swanlog), "
        "tensorboard (output_dir/tensorboard) or none.", choices=["swanlab", "tensorboard", "none"])
    project: str = setting("roletune", "Tracker project name.")
    distributed: str = setting(
        "ddp", "With several processes (--nproc, torchrun, accelerate launch): ddp keeps a whole model on each GPU; "
        "fsdp shards the frozen base across the GPUs, for bases one GPU cannot hold; deepspeed uses train.deepspeed.",
        choices=["ddp", "fsdp", "deepspeed"])
    deepspeed: str | None = setting(
        None, "DeepSpeed config JSON (e.g. ZeRO-3) for train.distributed=deepspeed; needs the deepspeed package.")


@dataclass
class PersonaConfig:
    names: list[str] = setting(
        None, "The character's names and aliases, for roletune eval's persona score; default: the training "
        "records' character and aliases fields, else read from data.system_prompt.", factory=list)
    probes: list[str] = setting(None, "Identity probes asked besides the built-in ones (你是谁？, Who are you?, ...).",
                                factory=list)
    break_prompts: list[str] = setting(
        None, "Prompts that try to make the model leave its character, besides the built-in ones.", factory=list)


@dataclass
class EvalConfig:
    steps: int | None = setting(None, "Eval loss on the held-out rows every N steps; default: every epoch.",
                                check=POSITIVE)
    sample_prompts: list[str] = setting(
        None, "Prompts answered before training and after each epoch; default: the first eval.samples held-out rows.",
        factory=list)
    samples: int = setting(4, "Held-out rows answered each epoch when eval.sample_prompts is empty.",
                           check=NON_NEGATIVE)
    max_new_tokens: int = setting(128, "Reply length cap for sample answers.", check=POSITIVE)
    persona: PersonaConfig = field(default_factory=PersonaConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = setting("runs/roletune", "Run folder: checkpoints, the adapter, the tokenizer and this config.")

    def cross_field_problems(self) -> list[str]:
        problems = []
        if not self.model.path:
            problems.append("model.path is required")
        if not self.data.path:
            problems.append("data.path is required")
        if not self.output_dir:
            problems.append("output_dir is required")
        if (self.train.distributed == "deepspeed") != (self.train.deepspeed is not None):
            problems.append("train.distributed=deepspeed and train.deepspeed (its config file) go together")
        if self.train.lm_head_loss == "chunked" and not self.train.reply_logits_only:
            problems.append("train.lm_head_loss=chunked needs train.reply_logits_only=true")
        if self.train.lm_head_loss == "chunked" and self.train.distributed in ("fsdp", "deepspeed"):
            problems.append(f"train.lm_head_loss=chunked reads the LM-head weight outside the model's forward, where "
                            f"train.distributed={self.train.distributed} may hold only a shard of it; use auto or full")
        if self.lora.grouped and not self.lora.fused:
            problems.append("lora.grouped needs lora.fused=true (it groups the fused branches)")
        if self.model.quantization != "none" and self.train.distributed != "ddp":
            problems.append(f"model.quantization={self.model.quantization} with train.distributed="
                            f"{self.train.distributed} is not supported (sharding a quantised base is untested "
                            "here); use train.distributed=ddp, each GPU holds the whole quantised base")
        return problems


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, validate everything at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides: typing.Sequence[str] = (), source: str = "config") -> Config:
    problems: list[str] = []
    raw = _deep_copy(raw)
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", problems)
    if not problems:
        problems.extend(cfg.cross_field_problems())
    if problems:
        # A problem with a key the command line set is the command line's, not the file's.
        keys = [item.partition("=")[0].strip() for item in overrides]
        mine = [p for p in problems if p.startswith("override ") or any(_mentions(p, key) for key in keys if key)]
        parts = [*([f"{source}: " + "; ".join(p for p in problems if p not in mine)] if len(mine) < len(problems)
                   else []),
                 *(["command-line override: " + "; ".join(mine)] if mine else [])]
        raise ConfigError("; ".join(parts))
    return cfg


def _mentions(problem: str, key: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", problem) is not None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return value


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"override {item!r} is not of the form key.sub=value")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # a plain string that merely looks like YAML syntax
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"override {key}: {part} is not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(cls, raw, prefix: str, problems: list[str]):
    """Make a `cls` from a mapping, appending every problem found to `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.')} must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            problems.append(f"unknown key {prefix}{key}{hint}")
    values = {}
    for name, f in known.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.", problems)
            continue
        ok, value = _coerce(raw[name], hint)
        if not ok:
            problems.append(f"{prefix}{name}={raw[name]!r}: expected {_type_name(hint)}")
            continue
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            problems.append(f"{prefix}{name}={value!r}: expected one of {', '.join(map(_yaml_word, choices))}")
        elif check and value is not None and not check[0](value):
            problems.append(f"{prefix}{name}={value!r}: {check[1]}")
        else:
            values[name] = value
    return cls(**values)


def _coerce(value, hint) -> tuple[bool, object]:
    """Check `value` against a type hint, converting the harmless cases (YAML reads 1e-4 as a string)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for member in (a for a in args if a is not type(None)):  # the first member type that takes the value
            ok, converted = _coerce(value, member)
            if ok:
                return ok, converted
        return False, None
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True, list(value)
        return False, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, None
        try:
            return True, float(value)
        except (TypeError, ValueError):
            return False, None
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # e.g. a numeric hub revision
        return isinstance(value, str), value
    raise TypeError(f"unsupported schema type {hint}")


def _yaml_word(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def describe(cls=Config, prefix: str = "") -> list[tuple[str, object, str]]:
    """(key, default, help) for every setting, for `roletune config` and docs/config.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """Every setting as Markdown, one table per section: docs/config.md is this text, written by
    `roletune config --markdown` (tests/test_docs.py checks that the two agree)."""

    def written(value) -> str:  # a default as YAML writes it
        if value is None:
            return "null"
        if isinstance(value, bool):
            return _yaml_word(value)
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return '""' if value == "" else str(value)

    def table(cls, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            kind = "one of " + ", ".join(f"`{_yaml_word(c)}`" for c in choices) if choices else _type_name(hints[f.name])
            meaning = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | {kind} | `{written(default)}` | {meaning} |")
        return lines

    out = ["# Config reference", "",
           "<!-- Generated from the schema in src/roletune/config.py: edit the help there, not here, then run",
           "     roletune config --markdown > docs/config.md -->", "",
           "Every key a roletune config accepts, with its type, default and meaning. A YAML file sets some of them;",
           "`section.key=value` after the file on the command line goes on top (`train.lr=2e-4`). Unknown keys",
           "and bad values are reported together before anything runs; `roletune config FILE [overrides]` prints",
           "the config fully resolved.", ""]
    def sections(cls, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                lines += [f"## {prefix}{f.name}", "", *table(hints[f.name], f"{prefix}{f.name}."), ""]
                lines += sections(hints[f.name], f"{prefix}{f.name}.")
        return lines

    out += sections(Config, "")
    out += ["## Top level", "", *table(Config, "")]
    return "\n".join(out) + "\n"
