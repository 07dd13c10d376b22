"""data from-novel --llm: the model's answers parsed, the book cut into chunks, and a real OpenAI-compatible
endpoint (roletune serve of a demo run, whose answers are no JSON) counted as unparsed, cached, resumed and
never a crash; recorded answers in the cache then attribute what the rules left out."""
import json
from pathlib import Path

import pytest

from conftest import free_port, requests_heard
from roletune.data import novel_llm, speech
from roletune.data.novel import write_dataset
from roletune.data.novel_llm import Asking, parse
from roletune.errors import DataError
from roletune.serve import client

# 黛玉 answers 宝玉 twice by tags; after the sign, 宝玉 and 黛玉 speak once more with no tag the rules read.
BOOK = """第一回

宝玉笑道：“妹妹从哪里来？”
黛玉道：“从苏州来。”
宝玉道：“苏州可好？”
黛玉道：“自然是好的。”
门上写着“荣禧堂”三个大字。
“这园子真大。”
“可不是。”
"""


@pytest.mark.parametrize("answer, speakers", [
    ('{"5": "黛玉", "6": null}', {5: "黛玉", 6: None}),
    ('```json\n{"5": "林黛玉"}\n```', {5: "林黛玉"}),  # fenced, as chat models like to
    ('The speakers are: {"6": "宝玉"} as far as I can tell.', {6: "宝玉"}),
    ('{"5": " ", "6": "宝玉"}', {5: None, 6: "宝玉"}),
    ('{"7": "黛玉"}', None),  # a quote it was not asked about
    ('{"5": ["黛玉"]}', None),
    ('["黛玉", "宝玉"]', None),
    ('{"5": "黛玉",}', None),  # not JSON
    ("黛玉说的。", None),
    ("", None),
])
def test_an_answer_is_read_only_when_it_is_the_json_asked_for(answer, speakers):
    assert parse(answer, [5, 6]) == speakers


def test_the_book_goes_in_chunks_that_ask_each_wanted_quote_once(tmp_path, monkeypatch):
    path = tmp_path / "book.txt"
    path.write_text(BOOK * 3, encoding="utf-8")
    book = speech.read_book([str(path)], [], None)
    monkeypatch.setattr(novel_llm, "CHUNK_CHARS", 60)
    wanted = {index for index, quote in enumerate(book.quotes) if not quote.speaker}
    chunks = novel_llm.chunks(book, wanted)
    asked = [index for _, indices in chunks for index in indices]
    assert sorted(asked) == sorted(wanted) and len(chunks) > 1
    first, second = chunks[0][0], chunks[1][0]
    assert "[5]“这园子真大。”" in first and "[0]“妹妹从哪里来？”" in first  # numbered, the asked and the others
    assert second.startswith("(before: …")  # the text before a chunk leads it, for context


@pytest.mark.slow
def test_an_endpoint_without_json_is_counted_cached_and_its_recorded_answers_attribute(server, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(BOOK, encoding="utf-8")
    cache = tmp_path / "answers.jsonl"
    asking = Asking(f"{server}/v1", "keeper", cache=str(cache))
    before = requests_heard(server)
    write_dataset([str(book)], role="黛玉", aliases=["林黛玉"], narrator=False, context=0, fmt="alpaca",
                  out=str(tmp_path / "first.json"), llm=asking)
    report = capsys.readouterr().out
    # The demo model answers no JSON: the one chunk is unparsed, and the rules' pairs are written all the same.
    assert "1 chunks (0 from the cache), 1 answers unparsed; 0 quotes attributed" in report
    assert len(json.loads((tmp_path / "first.json").read_text(encoding="utf-8"))) == 2
    assert requests_heard(server) == before + 1

    # The same answer as a model that knew would have given it: the cache serves it, the server is not asked.
    record = json.loads(cache.read_text(encoding="utf-8"))
    cache.write_text(json.dumps({**record, "answer": '{"4": null, "5": "宝玉", "6": "林黛玉"}'}, ensure_ascii=False)
                     + "\n", encoding="utf-8")
    write_dataset([str(book)], role="黛玉", aliases=["林黛玉"], narrator=False, context=0, fmt="alpaca",
                  out=str(tmp_path / "second.json"), llm=asking)
    report = capsys.readouterr().out
    assert "1 chunks (1 from the cache), 0 answers unparsed; 2 quotes attributed" in report
    assert "by LLM: 2" in report and requests_heard(server) == before + 1
    pairs = json.loads((tmp_path / "second.json").read_text(encoding="utf-8"))
    assert [(p["instruction"], p["output"]) for p in pairs] == [  # 林黛玉, an --alias, is the role
        ("妹妹从哪里来？", "从苏州来。"), ("苏州可好？", "自然是好的。"), ("这园子真大。", "可不是。")]


def test_an_endpoint_that_never_answers_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "RETRIES", 0)
    book = tmp_path / "book.txt"
    book.write_text(BOOK, encoding="utf-8")
    with pytest.raises(DataError, match=r"--llm http://127.0.0.1:\d+/v1/chat/completions: .*run again to go on"):
        write_dataset([str(book)], role="黛玉", aliases=[], narrator=False, context=0, fmt="alpaca",
                      out=str(tmp_path / "out.json"), llm=Asking(f"http://127.0.0.1:{free_port()}/v1", "nobody"))
    assert not Path(tmp_path / "out.json").exists()
