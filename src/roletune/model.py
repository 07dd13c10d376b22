"""Load the base model and tokenizer (local folder, Hugging Face hub, ModelScope), pick the
device and dtype, quantise the base for QLoRA (bitsandbytes), and apply LoRA with peft."""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch

from roletune.errors import ConfigError, ModelError, first_line
from roletune.run_dir import looks_like_hub_id
from roletune.speed import attention

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The projections of a decoder layer that read the same input tensor (Qwen2's, Llama's and Mistral's).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# A folder holds a tokenizer when it has one of these (a fast tokenizer's file, or a slow one's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

def resolve_device(spec: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`; asking for a GPU that is not there is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"model.device={spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"model.device={spec!r}: expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        seen = f"{count} GPU(s) are visible" if count else "no GPU is visible to PyTorch"
        raise ConfigError(f"model.device={spec}: {seen}; check CUDA_VISIBLE_DEVICES or use model.device=cpu")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # fp32 on CPU: bf16 matmuls are slow on most CPUs and fp32 keeps small-model tests exact.
    return torch.float32


def resolve_source(location: str, revision: str | None = None) -> str:
    """Where from_pretrained reads `location`: a local folder; a hub id, once the hub has said it holds it
    (or from the local cache when the hub cannot be reached); `modelscope:ID`, downloaded with modelscope."""
    if location.startswith("modelscope:"):
        return _modelscope_folder(location)
    if Path(location).expanduser().exists():
        return str(Path(location).expanduser())
    if not looks_like_hub_id(location):
        raise ModelError(f"{location}: no such folder")
    return _checked_hub_id(location, revision)


@functools.cache
def _checked_hub_id(repo_id: str, revision: str | None) -> str:
    """`repo_id` once the hub confirms it, in one request of at most HUB_TIMEOUT_S; transformers' own
    downloads retry a failing connection for most of a minute before saying the hub is out of reach."""
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.is_offline_mode():  # HF_HUB_OFFLINE=1: transformers reads the cache and says what it lacks
        return repo_id
    try:
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        return repo_id
    except GatedRepoError:
        raise ModelError(f"{repo_id}: a gated model; accept its terms on its hub page and log in "
                         "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id}: no such folder here, and no such model on the Hugging Face hub "
                         "(a private one needs hf auth login)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id}: the hub has no revision {revision} of it (model.revision)") from None
    except HFValidationError:
        raise ModelError(f"{repo_id}: no such folder, and not a hub model id") from None
    except Exception as exc:  # the connection failed (the client's own error types) or the hub answered 5xx
        unreachable = first_line(exc)
    try:
        cached = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        raise ModelError(f"{repo_id}: the Hugging Face hub cannot be reached ({unreachable}) and the model is not in "
                         "the local cache; give a local folder, or download it where the hub is reachable and set "
                         "HF_HUB_OFFLINE=1") from None
    log.warning("%s: the Hugging Face hub cannot be reached (%s); using the cached copy", repo_id, unreachable)
    return cached


HUB_TIMEOUT_S = 10


def _modelscope_folder(location: str) -> str:
    if importlib.util.find_spec("modelscope") is None:
        raise ConfigError(f"{location}: install the modelscope package (pip install modelscope) to load "
                          "from ModelScope")
    from modelscope import snapshot_download

    try:
        return snapshot_download(location.removeprefix("modelscope:"))
    except Exception as exc:  # modelscope raises many types; the message is what the user needs
        raise ModelError(f"{location}: ModelScope download failed ({first_line(exc)})") from None


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    location = model_cfg.tokenizer or model_cfg.path
    warn_remote_code(model_cfg, location)
    source = resolve_source(location, model_cfg.revision)
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{location}: no tokenizer files in this folder ({', '.join(TOKENIZER_FILES[:2])}); "
                         "set model.tokenizer to the folder or hub id that has them")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{location}: cannot load the tokenizer ({first_line(exc)})") from None
    if not tokenizer.chat_template:
        raise ModelError(f"{location}: the tokenizer has no chat template; use an instruct/chat model's tokenizer "
                         "or set model.tokenizer to one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention anyway
    return tokenizer


def load_base_model(model_cfg, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    warn_remote_code(model_cfg, model_cfg.path)
    source = resolve_source(model_cfg.path, model_cfg.revision)
    check_weight_files(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype,
            attn_implementation=attention.loaded_as(model_cfg.attn_implementation),
            trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
            quantization_config=quantization_config(model_cfg, dtype),
            # safetensors only: a pickle file (pytorch_model.bin) can run code when loaded
            use_safetensors=None if model_cfg.allow_pickle else True,
            device_map={"": str(device)})  # straight onto the chosen device, never via cuda:0
    except (OSError, ValueError, ImportError) as exc:
        hint = ("; only safetensors weights are loaded: set model.allow_pickle=true to load pickle weights you trust"
                if not model_cfg.allow_pickle and "safetensors" in str(exc) else "")
        raise ModelError(f"{model_cfg.path}: cannot load the model ({first_line(exc)}){hint}") from None
    return model


def require_bitsandbytes(model_cfg) -> None:
    if model_cfg.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={model_cfg.quantization}: the bitsandbytes package is not installed "
                          "(pip install roletune[qlora])")


def quantization_config(model_cfg, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantization; None loads the weights as stored."""
    if model_cfg.quantization == "none":
        return None
    require_bitsandbytes(model_cfg)
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        # LLM.int8 always multiplies in fp16 and warns so on every forward pass; nothing to act on.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    # The QLoRA paper's recipe: NF4 with the quantisation constants quantised too; the dequantised
    # matmuls run in the model's dtype (bf16 on GPUs, fp32 on CPU with model.dtype=auto).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_adapter(model, folder: str, allow_pickle: bool = False):
    """The trained LoRA adapter on top of `model`; a pickle adapter only when allowed (unpickling can run code)."""
    from peft import PeftModel

    path = Path(folder)
    if not (path / "adapter_model.safetensors").is_file() and (path / "adapter_model.bin").is_file() \
            and not allow_pickle:
        raise ModelError(f"{folder}: the adapter is a pickle file (adapter_model.bin), which can run code when "
                         "loaded; set model.allow_pickle=true in the run's roletune.yaml if you trust it")
    check_weight_files(folder)
    try:
        return PeftModel.from_pretrained(model, folder)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: the adapter's shapes do not fit this base
        raise ModelError(f"{folder}: cannot load the adapter ({first_line(exc)})") from None


def check_weight_files(folder: str) -> None:
    """Every .safetensors file of a local `folder` whole, or a ModelError naming the first that is not: a
    truncated copy otherwise fails deep inside safetensors, with a traceback that names no file."""
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else ():
        problem = safetensors_problem(file)
        if problem:
            raise ModelError(f"{file}: {problem}; the file is damaged or was not copied whole")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file, from its header (8 bytes of length, then JSON giving each
    tensor's byte range) and its size; None when both agree. The tensors themselves are not read."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else None
        if length is None or length > size - 8:
            return f"truncated ({size:,d} bytes, less than its header)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is unreadable)"
    if size < 8 + length + end:
        return f"truncated ({size:,d} of {8 + length + end:,d} bytes)"
    return None


def warn_remote_code(model_cfg, location: str) -> None:
    """trust_remote_code runs the repository's Python: say so, naming the repository, once per location."""
    if model_cfg.trust_remote_code and location not in _warned_remote_code:
        _warned_remote_code.add(location)
        log.warning("model.trust_remote_code is on: Python code from %s will run on this machine", location)


_warned_remote_code: set[str] = set()


def load_model_config(model_cfg):
    """The base model's transformers config (config.json): its architecture, without weights."""
    from transformers import AutoConfig

    warn_remote_code(model_cfg, model_cfg.path)
    try:
        return AutoConfig.from_pretrained(resolve_source(model_cfg.path, model_cfg.revision),
                                          trust_remote_code=model_cfg.trust_remote_code,
                                          revision=model_cfg.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_cfg.path}: cannot read the model config ({first_line(exc)})") from None


def build_meta_model(model_cfg):
    """The base model's architecture without weights, for dry runs: only the config is read."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(model_cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                trust_remote_code=model_cfg.trust_remote_code)


def apply_lora(model, lora_cfg, checkpointed_layers: int = 0):
    """LoRA adapters on `model`, with the first `checkpointed_layers` decoder layers checkpointed."""
    import peft

    if getattr(model, "is_quantized", False) and model.get_input_embeddings().weight.dtype == torch.float16:
        # peft's QLoRA preparation puts the weights bitsandbytes left unquantised (embeddings, norms, LM head)
        # in fp32, where fp16 would overflow. roletune asks it for nothing else: the base is frozen by
        # get_peft_model anyway, and gradient checkpointing follows train.gradient_checkpointing (peft would
        # switch it on). In bf16 (and fp32) the step is skipped on purpose: Qwen2's norms compute in fp32
        # already, so the fp32 copies would only cost memory (+2 GiB for a 7B model's embeddings and head,
        # and an fp32 residual stream) for the precision roletune's unquantised bf16 LoRA trains with.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules[0] if lora_cfg.target_modules == ["all-linear"]
        else lora_cfg.target_modules)
    try:
        # peft upcasts bf16/fp16 adapter weights to fp32 unless told not to.
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=lora_cfg.dtype != "bf16")
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules={lora_cfg.target_modules}: {first_line(exc)}") from None
    if lora_cfg.dtype == "bf16":
        # peft gives an adapter its base layer's float dtype; an LLM.int8 layer has none, so it stays fp32.
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if checkpointed_layers:
        checkpoint_first_layers(model.get_base_model(), checkpointed_layers)
    return model


def checkpoint_first_layers(model, count: int) -> None:
    """Activation checkpointing for the first `count` decoder layers of a transformers model, the others
    keeping their activations.

    transformers checkpoints every decoder layer (or every n-th); each layer (a GradientCheckpointingLayer)
    recomputes only while its own `gradient_checkpointing` flag is set, so the flag is cleared again past
    the first `count`. The first ones, because backward reaches them last: by the time it rebuilds one of
    them, the later layers have handed back their full activations, so the rebuild never adds to the peak
    (it does with the last layers checkpointed). Done here, once, rather than with TrainingArguments'
    activation_checkpointing, which makes Trainer enable every layer again at the start of train().
    Non-reentrant checkpointing gives LoRA its gradients without hooks on the inputs, and restores the RNG
    state when it recomputes, so dropout masks (and the result) are the same with it or without.
    Enabling also makes the embeddings' output require grad (enable_input_require_grads): with a frozen
    base the checkpointed blocks' inputs need it, or LoRA would get no gradient through them.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in decoder_layers(model)[count:]:
        layer.gradient_checkpointing = False


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (its GradientCheckpointingLayers), first to last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def check_lora_dtype(lora_cfg, dtype: torch.dtype) -> None:
    """bf16 adapters belong on a bf16 base: on fp32 they only lose precision, and on fp16 they would mix two
    half formats under fp16's loss scaler."""
    if lora_cfg.dtype == "bf16" and dtype != torch.bfloat16:
        loads = {value: name for name, value in DTYPES.items()}[dtype]
        raise ConfigError(f"lora.dtype=bf16 needs bf16 base weights, but the base loads in {loads}; "
                          "set model.dtype=bf16 (auto means fp32 on CPU, fp16 on GPUs without bf16) or lora.dtype=auto")
