import http.server
import threading

import pytest

from roletune.config import DataConfig
from roletune.data import Message, load_conversations
from roletune.errors import DataError

SYSTEM = "你是守灯人。"


def load(path, **kw):
    return load_conversations(DataConfig(path=str(path), system_prompt=kw.pop("system_prompt", SYSTEM), **kw))


def test_alpaca_with_input_history_and_own_system(write_json):
    rows = [
        {"instruction": "你是谁？", "input": "", "output": "我是林小满。"},
        {"instruction": "翻译", "input": "wind", "output": "风", "system": "你是翻译。",
         "history": [["早", "早安"]]},
    ]
    first, second = load(write_json(rows))
    assert first == [Message("system", SYSTEM), Message("user", "你是谁？"), Message("assistant", "我是林小满。")]
    assert second == [Message("system", "你是翻译。"), Message("user", "早"), Message("assistant", "早安"),
                      Message("user", "翻译\nwind"), Message("assistant", "风")]


def test_sharegpt_and_messages_jsonl(write_json):
    sharegpt = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    messages = [{"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "a"},
                              {"role": "assistant", "content": "b"}]}]
    assert load(write_json(sharegpt, "s.jsonl", jsonl=True)) == [
        [Message("system", SYSTEM), Message("user", "hi"), Message("assistant", "hello")]]
    assert load(write_json(messages, "m.jsonl", jsonl=True))[0][0] == Message("system", "own")


def test_no_system_prompt_means_no_system_message(write_json):
    conversation = load(write_json([{"instruction": "q", "output": "a"}]), system_prompt=None)[0]
    assert [m.role for m in conversation] == ["user", "assistant"]


def test_format_can_be_forced(write_json):
    path = write_json([{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"record 0: field messages: expected a non-empty list"):
        load(path, format="messages")


@pytest.mark.parametrize("record, message", [
    ({"instruction": "q"}, r"record 0: field output: missing"),
    ({"instruction": "q", "output": 3}, r"record 0: field output: expected a string, got int"),
    ({"instruction": "q", "output": "  "}, r"record 0: field output: empty reply"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"field history\[0\]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, r"two user turns in a row"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"ends with a user turn"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"field messages\[0\].role: unknown role 'bot'; expected one of system, user, assistant"),
    ({"conversations": [{"from": "human"}]}, r"field conversations\[0\].value: expected a string"),
    ({"text": "free text"}, r"record 0: cannot tell the format"),
    ("just a string", r"record 0: expected a JSON object, got str"),
    ({"instruction": "q", "output": "a", "character": ["甄嬛"]}, r"record 0: field character: expected the character's name"),
    ({"instruction": "q", "output": "a", "aliases": "嬛嬛"}, r"record 0: field aliases: expected a list of names"),
])
def test_bad_records_name_file_record_and_field(write_json, record, message):
    path = write_json([record])
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(err.value).startswith(str(path))


def test_records_may_name_their_character_most_named_first(write_json):
    from collections import Counter

    rows = [{"instruction": "q", "output": "a", "character": "甄嬛", "aliases": ["嬛嬛"]},
            {"instruction": "p", "output": "b", "character": "甄嬛"}, {"instruction": "r", "output": "c"}]
    names = Counter()
    assert len(load_conversations(DataConfig(path=str(write_json(rows))), names=names)) == 3
    assert [name for name, _ in names.most_common()] == ["甄嬛", "嬛嬛"]


def test_bad_record_deep_in_the_file_is_located(write_json):
    rows = [{"instruction": "q", "output": "a"}] * 5 + [{"instruction": "q", "output": None}]
    with pytest.raises(DataError, match=r"record 5: field output"):
        load(write_json(rows))


def test_malformed_json_and_jsonl_report_the_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n')
    with pytest.raises(DataError, match=r"broken.json: line 3, column \d+: invalid JSON"):
        load(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", oops}\n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid JSON"):
        load(lines)


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        load(tmp_path / "nope.json")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.json: the file is empty"):
        load(empty)
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes('[{"instruction": "你好", "output": "好"}]'.encode("gb18030"))
    with pytest.raises(DataError, match="gbk.json: not UTF-8"):
        load(gbk)


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www (loopback only; the tests never leave the machine)."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("ROLETUNE_CACHE", str(tmp_path / "cache"))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_is_downloaded_and_read(http_root):
    root, base = http_root
    (root / "rows.json").write_text('[{"instruction": "q", "output": "a"}]')
    assert len(load(f"{base}/rows.json")) == 1


def test_missing_url_and_unreachable_host(http_root):
    _, base = http_root
    with pytest.raises(DataError, match=r"rows404.json: download failed \(HTTP 404"):
        load(f"{base}/rows404.json")
    with pytest.raises(DataError, match=r"cannot reach it"):
        load("http://127.0.0.1:9/rows.json")


def test_a_record_with_an_empty_prompt_is_left_out_with_a_warning_unless_strict(write_json, caplog):
    """huanhuan-chat's 西游记白话文.json has one record where the character speaks first; it must not sink the
    file. data.strict=true refuses it as before; a record without a reply is refused either way."""
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "", "input": "", "output": "先开口"},
            {"instruction": "q2", "output": "b"}]
    path = write_json(rows)
    left_out = []
    conversations = load_conversations(DataConfig(path=str(path)), left_out)
    assert [c[-1].content for c in conversations] == ["a", "b"] and left_out == [1]
    assert f"{path}: left out 1 record(s) with an empty prompt (instruction and input both empty): record 1" \
        in caplog.text and "data.strict=true" in caplog.text
    with pytest.raises(DataError, match=r"record 1: field instruction: empty prompt .*\(data.strict\)"):
        load(path, strict=True)
    with pytest.raises(DataError, match=r"record 1: field output: missing"):
        load(write_json([rows[0], {"instruction": "", "input": ""}]))
    with pytest.raises(DataError, match=r": no record has a prompt"):
        load(write_json([rows[1]]))


def test_a_record_of_no_layout_deep_in_the_file_lists_the_layouts(write_json):
    rows = [{"instruction": "q", "output": "a"}] * 3 + [{"prompt": "q", "completion": "a"}]
    with pytest.raises(DataError, match=r"record 3: cannot tell the format from fields \['completion', 'prompt'\]; "
                                        r"expected instruction/output \(alpaca\), conversations \(sharegpt\) or "
                                        r"messages"):
        load(write_json(rows))
