"""Property-based tests of the data readers: random and malformed JSON / JSONL, wrong types, huge
fields, invalid UTF-8 and odd Unicode are either read correctly or rejected with one line naming the
file (and record); never a traceback, a hang, or a partially written output.

Bounded for CI: a fixed number of examples each, no example database, and a per-example time limit.
"""
from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from roletune.config import DataConfig
from roletune.data import load_conversations
from roletune.data.conversation import Message, structure_problem
from roletune.errors import DataError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
EXAMPLE_LIMIT_S = 10  # any single example taking longer counts as a hang

# Characters that break decoders, line splitting and tokenizers (lone surrogates come in as damage below).
ODD = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\r", "\r\n", "\n", "\x00", "\ufeff", "\u200b", "\u200d",
       "\u202e", "👩\u200d👩\u200d👧", "灯塔", "e\u0301", "\U0010ffff", '"', "\\", "{", "]", " "]
texts = st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=30), st.sampled_from(ODD),
                  st.lists(st.sampled_from(ODD) | st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=4),
                           max_size=6).map("".join))
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=10)


def mostly(usual, odd):
    """`usual` three times in four, so that many records are readable and the read path is exercised too."""
    return st.one_of(usual, usual, usual, odd)


def turn(role_key: str, text_key: str, roles: list[str]):
    return st.fixed_dictionaries({role_key: mostly(st.sampled_from(roles), json_values),
                                  text_key: mostly(texts, json_values)}, optional={"extra": json_values})


def alternating(role_key: str, text_key: str, user: str, assistant: str):
    """Turns in the expected order (user, assistant, ...), so that structure is not always what fails."""
    return st.lists(st.tuples(mostly(texts, json_values), mostly(texts, json_values)), min_size=1, max_size=3).map(
        lambda pairs: [{role_key: role, text_key: text} for pair in pairs for role, text in zip((user, assistant), pair)])


# One strategy per layout: a file holds one layout (the first record decides it), then odd values.
layouts = [
    st.fixed_dictionaries({"instruction": mostly(texts, json_values), "output": mostly(texts, json_values)},
                          optional={"input": mostly(texts, json_values), "system": mostly(texts, json_values),
                                    "history": mostly(st.lists(st.lists(texts, min_size=2, max_size=2), max_size=2),
                                                      json_values)}),
    st.fixed_dictionaries({"conversations": st.one_of(alternating("from", "value", "human", "gpt"),
                                                      st.lists(turn("from", "value", ["human", "gpt", "system", "bot"]),
                                                               max_size=4), json_values)}),
    st.fixed_dictionaries({"messages": st.one_of(alternating("role", "content", "user", "assistant"),
                                                 st.lists(turn("role", "content", ["system", "user", "assistant", "tool"]),
                                                          max_size=4), json_values)}),
    json_values,
]
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf", b"\\ud800", b"\\udfff", b"\r", b"\n"]


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(file name, contents): a JSON list or JSONL of fuzzed records, then maybe damaged, or raw bytes."""
    suffix = draw(st.sampled_from([".json", ".jsonl"]))
    rows = draw(st.lists(draw(st.sampled_from(layouts)), max_size=5))
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        body = json.dumps(rows, ensure_ascii=ascii_only).encode()
    else:
        body = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows).encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "insert", "bad_bytes", "bom", "crlf", "raw"]))
    at = draw(st.integers(0, len(body)))
    if damage == "truncate":
        body = body[:at]
    elif damage == "insert":
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif damage == "bad_bytes":  # invalid UTF-8, a NUL, a BOM mid-file, a lone surrogate escape, a line break
        body = body[:at] + draw(st.sampled_from(BAD_BYTES)) + body[at:]
    elif damage == "bom":
        body = b"\xef\xbb\xbf" + body
    elif damage == "crlf":
        body = body.replace(b"\n", b"\r\n")
    elif damage == "raw":
        body = draw(st.binary(max_size=64))
    return "data" + suffix, body


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"took over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_or_reject(path: Path):
    """The conversations, or None after checking the rejection is one line naming the file."""
    try:
        with time_limit(EXAMPLE_LIMIT_S):
            conversations = load_conversations(DataConfig(path=str(path)))
    except DataError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message and "\r" not in message, message
        return None
    assert conversations
    for conversation in conversations:
        assert structure_problem(conversation) is None
        for message in conversation:
            message.content.encode("utf-8")  # real text: a tokenizer can take it
    return conversations


@FUZZ
@given(data_files())
@example(("deep.json", b"[" * 100_000))
@example(("deep2.json", b'{"a": ' + b"[" * 100_000))
@example(("deep.jsonl", b'{"a": ' + b"[" * 100_000))
@example(("big.json", b'[{"instruction": "q", "output": "a", "n": ' + b"9" * 5000 + b"}]"))
@example(("big.jsonl", b'{"instruction": "q", "output": "a", "n": ' + b"9" * 5000 + b"}"))
@example(("lone.json", b'[{"instruction": "q\\ud800", "output": "a"}]'))
@example(("bytes.jsonl", b'{"instruction": "q", "output": "\xff\xfe"}'))
def test_any_file_is_read_or_rejected_in_one_line(tmp_path_factory, case):
    name, body = case
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(body)
    read_or_reject(path)


valid_text = texts.filter(str.strip)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": valid_text, "output": valid_text}), min_size=1, max_size=4),
       jsonl=st.booleans(), ascii_only=st.booleans())
@example(rows=[{"instruction": "长" * 2_000_000, "output": "x" * 2_000_000}], jsonl=True, ascii_only=False)
@example(rows=[{"instruction": "a\u2028b", "output": "c\x85d"}], jsonl=True, ascii_only=False)
def test_valid_records_with_any_text_are_read_back_exactly(tmp_path_factory, rows, jsonl, ascii_only):
    path = tmp_path_factory.mktemp("fuzz") / ("rows.jsonl" if jsonl else "rows.json")
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    path.write_text("\n".join(lines) if jsonl else "[" + ",\n".join(lines) + "]", encoding="utf-8")
    conversations = read_or_reject(path)
    assert conversations is not None, path.read_text(encoding="utf-8")[:200]
    assert conversations == [[Message("user", r["instruction"]), Message("assistant", r["output"])] for r in rows]


@pytest.fixture(scope="module")
def cached_tokenizer(tiny_model):
    from roletune.config import ModelConfig
    from roletune.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(tiny_model)))


@settings(FUZZ, max_examples=40)
@given(case=data_files())
@example(case=("lone.json", b'[{"instruction": "q\\ud800", "output": "a"}]'))
def test_data_preview_never_shows_a_traceback(tmp_path_factory, tiny_model, cached_tokenizer, monkeypatch, case):
    import roletune.model
    from roletune.cli import main

    monkeypatch.setattr(roletune.model, "load_tokenizer", lambda model_cfg: cached_tokenizer)  # 2 s a load
    folder = tmp_path_factory.mktemp("cli")
    name, body = case
    (folder / name).write_bytes(body)
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)},
                                      "data": {"path": str(folder / name), "max_length": 64}}), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(EXAMPLE_LIMIT_S):
        code = main(["data", "preview", str(config), "-n", "2"])
    assert code in (0, 1), err.getvalue()
    if code == 1:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith(f"roletune: error: {folder / name}: ")
    else:
        assert "--- example 0" in out.getvalue()


screenplay_lines = st.lists(
    st.one_of(st.sampled_from(["甄嬛：臣妾在。", "皇上：起来吧。", "（众人退下）", "第1幕", "Scene 2", "ANNA: hi", "甄嬛（笑）：是。",
                               "皇后；……", ""]),
              st.tuples(st.sampled_from(["甄嬛", "皇上", "ANNA", "", "：", ":"]), st.sampled_from(["：", ":", "", "（"]),
                        texts).map("".join)),
    max_size=12)


@settings(FUZZ, max_examples=100)
@given(lines=screenplay_lines, fmt=st.sampled_from(["alpaca", "messages"]), raw=st.none() | st.binary(max_size=40))
def test_from_script_writes_a_whole_file_or_nothing(tmp_path_factory, lines, fmt, raw):
    from roletune.data import screenplay

    folder = tmp_path_factory.mktemp("script")
    script = folder / "script.txt"
    script.write_bytes(raw if raw is not None else "\n".join(lines).encode())
    out = folder / ("pairs.json" if fmt == "alpaca" else "pairs.jsonl")
    try:
        with contextlib.redirect_stdout(io.StringIO()), time_limit(EXAMPLE_LIMIT_S):
            screenplay.write_dataset([str(script)], role="甄嬛", aliases=[], context=0, fmt=fmt, out=str(out))
    except DataError as exc:
        assert "\n" not in str(exc), str(exc)
        assert not out.exists() and not list(folder.glob("*.tmp")), "a failed run left a file behind"
        return
    assert read_or_reject(out), "from-script wrote a dataset that training cannot read"
