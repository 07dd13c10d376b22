"""The offline-built Qwen2.5 tokenizer tokenizes exactly like the real one in ../shared."""
import json
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from roletune.demo import tokenizer as demo_tokenizer
from roletune.demo.tokenizer import build_qwen_tokenizer

SHARED = Path(__file__).parents[2].parent / "shared"
REFERENCE_DIR = SHARED / "tokenizers/qwen2.5"
HUANHUAN = SHARED / "data/huanhuan.json"

TEXTS = [
    "Hello, how are you?",
    "The quick brown fox doesn't jump; it's LAZY, isn't it? I'll see, we'd've known.",
    "小姐，别的秀女都在求中选，唯有咱们小姐想被撂牌子。",
    "混合 mixed 文本 with English 和中文，还有全角标点！？",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    '{"a": [1, 2.5e-3, -7], "b": null}  // x += 1; y != z && w <= 0',
    "3.14159 1234567890 0x1F 1,000,000 ١٢٣ ½ ²",
    "emoji 😀👍🏽👨‍👩‍👧 🇨🇳 ❤️ and CJK ext 𠮷",
    "spaces:  two   three    four\ttab \t mixed   ",
    "   leading and trailing   ",
    "lines\n\nblank\r\nwindows\rold-mac\n\n\n",
    "\n",
    " ",
    "",
    "before<|im_start|>user\nhi<|im_end|>after <|endoftext|> x",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "almost special: <|im_end| <im_end|> <|unknown|>",
    "Ünïcödé ñ ß ø å Ω ж ع ह ไทย 한국어 日本語のテキスト",
    "e\u0301 composed by NFC",  # decomposed é: both tokenizers normalize to NFC
]

CONVERSATION = [
    {"role": "system", "content": "你是甄嬛，大理寺少卿甄远道之女。"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
    {"role": "user", "content": "Say it in English, please."},
]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": {"type": "object", "properties": {}}}}]


def huanhuan_lines(n=200):
    if not HUANHUAN.is_file():
        return []
    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))[:n]
    return [r["instruction"] for r in records] + [r["output"] for r in records]


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
    start = time.perf_counter()
    out_dir = build_qwen_tokenizer(tmp_path_factory.mktemp("qwen2.5"))
    print(f"build_qwen_tokenizer: {time.perf_counter() - start:.1f} s")
    return out_dir


@pytest.fixture(scope="module")
def built(built_dir):
    return AutoTokenizer.from_pretrained(built_dir)


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"no reference tokenizer at {REFERENCE_DIR}")
    return AutoTokenizer.from_pretrained(REFERENCE_DIR)


@pytest.fixture(scope="module")
def samples(built):
    chat = built.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    return TEXTS + [chat] + huanhuan_lines()


@pytest.mark.slow
def test_folder_holds_what_auto_tokenizer_needs(built_dir, built):
    assert {p.name for p in built_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert len(built) == 151665
    assert built.eos_token == "<|im_end|>" and built.eos_token_id == 151645
    assert built.pad_token == "<|endoftext|>" and built.pad_token_id == 151643
    assert built.bos_token is None
    assert built.encode("Hello, how are you?") == [9707, 11, 1246, 525, 498, 30]


def test_files_match_reference(built_dir, reference):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((built_dir / name).read_text("utf-8")) == json.loads((REFERENCE_DIR / name).read_text("utf-8")), name
    assert (built_dir / "chat_template.jinja").read_text("utf-8") == (REFERENCE_DIR / "chat_template.jinja").read_text("utf-8")


def test_encode_matches_reference(built, reference, samples):
    assert len(samples) > 400  # the huanhuan lines are there
    for text in samples:
        assert built.encode(text) == reference.encode(text), text


def test_decode_round_trips(built, samples):
    for text in samples:
        if text.startswith("e\u0301"):
            continue  # NFC normalization changes the text itself
        assert built.decode(built.encode(text)) == text, text


def test_not_special_tokens_survive_skip_special_tokens(built):
    ids = built.encode("<|im_start|>x<|im_end|><tool_call>y</tool_call><|fim_pad|>")
    assert built.decode(ids, skip_special_tokens=True) == "x<tool_call>y</tool_call><|fim_pad|>"


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
def test_chat_template_ids_match_reference(built, reference, tools):
    kwargs = dict(tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = built.apply_chat_template(CONVERSATION, **kwargs)
    assert ids == reference.apply_chat_template(CONVERSATION, **kwargs)
    assert ids[:1] == [151644] and ids.count(151645) == len(CONVERSATION)


def test_wrong_ids_raise(built_dir, monkeypatch):
    monkeypatch.setitem(demo_tokenizer.KNOWN_IDS, "Hello, how are you?", [1, 2, 3])
    with pytest.raises(RuntimeError, match="Hello, how are you"):
        demo_tokenizer._check_known_ids(built_dir)
