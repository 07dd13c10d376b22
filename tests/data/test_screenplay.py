"""roletune data speakers / from-script: screenplay layout rules, both outputs, the report, bad input."""
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from roletune.cli import main
from roletune.config import DataConfig
from roletune.data import Message, load_conversations, screenplay
from roletune.errors import DataError

SCRIPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "scripts"
HUANHUAN = SCRIPTS.parent / "huanhuan.json"


def write_script(folder: Path, text: str, name: str = "script.txt", encoding: str = "utf-8") -> str:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def cut(tmp_path, text, role="甄嬛", aliases=(), context=0, fmt="alpaca"):
    """Run from-script on one inline script; alpaca gives (instruction, output) pairs, messages gives dicts."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    out = folder / ("out.json" if fmt == "alpaca" else "out.jsonl")
    screenplay.write_dataset([write_script(folder, text)], role=role, aliases=list(aliases), context=context,
                             fmt=fmt, out=str(out))
    if fmt == "alpaca":
        return [(r["instruction"], r["output"]) for r in json.loads(out.read_text(encoding="utf-8"))]
    return [json.loads(line)["messages"] for line in out.read_text(encoding="utf-8").splitlines()]


# --- layout rules --------------------------------------------------------------------------------

def test_colons_and_parentheses_full_width_or_ascii(tmp_path):
    script = ("眉庄：你来了。\n"
              "甄嬛：姐姐。\n"
              "眉庄:坐吧。\n"
              "甄嬛（笑）：好。\n"
              "眉庄(低声):小心（看门外）些。\n"
              "甄嬛 (点头) : 知道了(转身)。\n")
    assert cut(tmp_path, script) == [("你来了。", "姐姐。"), ("坐吧。", "好。"), ("小心些。", "知道了。")]


def test_a_direction_inside_the_name_may_hold_a_colon(tmp_path):
    script = "槿汐（念：岁岁平安）：小主，是这几个字。\n甄嬛：收好吧。\n"
    assert cut(tmp_path, script) == [("小主，是这几个字。", "收好吧。")]


def test_blank_lines_are_ignored_and_stage_direction_lines_end_an_exchange(tmp_path):
    script = ("（碎玉轩，夜）\n"
              "浣碧：小主，药熬好了。\n"
              "\n"
              "甄嬛：放着吧。\n"
              "浣碧：是。\n"
              "（甄嬛起身走到窗前）\n"
              "甄嬛：今晚月色真好。\n")
    assert cut(tmp_path, script) == [("小主，药熬好了。", "放着吧。")]


@pytest.mark.parametrize("heading", ["第2幕", "第十二集", "第3场（续）", "第 4 幕", "Scene 5", "EPISODE 2"])
def test_headings_start_a_new_scene(tmp_path, heading):
    script = f"第1幕\n眉庄：妹妹早。\n甄嬛：姐姐早。\n{heading}\n甄嬛：谁在外面？\n流朱：是我。\n甄嬛：进来吧。\n"
    assert cut(tmp_path, script) == [("妹妹早。", "姐姐早。"), ("是我。", "进来吧。")]


def test_a_new_file_starts_a_new_scene(tmp_path):
    first = write_script(tmp_path, "眉庄：妹妹早。\n", "01.txt")
    second = write_script(tmp_path, "甄嬛：姐姐早。\n流朱：小主。\n甄嬛：嗯。\n", "02.txt")
    out = tmp_path / "out.json"
    screenplay.write_dataset([first, second], role="甄嬛", aliases=[], context=0, fmt="alpaca", out=str(out))
    assert [r["output"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["嗯。"]


def test_plain_english_layout(tmp_path):
    script = ("Scene 1\n"
              "ELIZABETH: Do you dance, Mr. Darcy?\n"
              "MR. DARCY (aside): Not if I can help it.\n"
              "ELIZABETH: Then we (she smiles) shall sit.\n"
              "Mrs. Bennet: Lizzy!\n"
              "ELIZABETH: Coming, Mama.\n")
    assert cut(tmp_path, script, role="ELIZABETH") == [("Not if I can help it.", "Then we shall sit."),
                                                       ("Lizzy!", "Coming, Mama.")]


@pytest.mark.parametrize("line", [
    "皇后；有几分相似已经是很难得的了。",  # a semicolon is not a colon
    "朕今日过来，是有个打算想告诉你：朕想让你学着点管家的事。",  # sentence punctuation: no name
    "She said to him slowly and quietly: go.",  # too many words for a name
    "10:30 the bell rings",  # no letter: no name
])
def test_a_line_that_fits_no_rule_is_reported_and_no_pair_is_cut_across_it(tmp_path, capsys, line):
    script = f"眉庄：妹妹。\n{line}\n甄嬛：是。\n眉庄：走吧。\n甄嬛：好。\n"
    assert cut(tmp_path, script) == [("走吧。", "好。")]
    report = capsys.readouterr().out
    assert "no layout rule" in report and f"script.txt:2: {line[:20]}" in report
    assert "skipped 1: follows a line that fits no layout rule" in report


def test_only_the_single_line_before_is_the_prompt(tmp_path):
    script = "皇后：都起来吧。\n华妃：谢娘娘。\n甄嬛：谢皇后娘娘。\n"
    assert cut(tmp_path, script) == [("谢娘娘。", "谢皇后娘娘。")]


def test_skipped_lines_opening_continuing_empty_and_duplicate(tmp_path, capsys):
    script = ("第1幕\n"
              "甄嬛：有人吗？\n"  # opens the scene
              "流朱：小姐。\n"
              "甄嬛：嗯。\n"
              "甄嬛：去打水。\n"  # follows the role's own line
              "流朱：是。\n"
              "甄嬛：（点头）\n"  # nothing left after the stage direction
              "流朱：小姐。\n"
              "甄嬛：嗯。\n")  # the same pair again
    assert cut(tmp_path, script) == [("小姐。", "嗯。")]
    report = capsys.readouterr().out
    for reason in ["opens its scene", "follows the role's own line", "empty after removing stage directions",
                   "duplicate of an earlier pair"]:
        assert f"skipped 1: {reason}" in report


def test_an_empty_line_of_another_speaker_is_not_a_prompt(tmp_path):
    script = "皇帝：你可愿意？\n苏培盛：（低头）\n甄嬛：臣妾愿意。\n"
    assert cut(tmp_path, script) == [("你可愿意？", "臣妾愿意。")]


def test_aliases_speak_as_the_role(tmp_path):
    script = "皇帝：莞莞。\n莞嫔：皇上。\n皇帝：嬛嬛。\n甄嬛：臣妾在。\n"
    assert cut(tmp_path, script, aliases=["莞嫔"]) == [("莞莞。", "皇上。"), ("嬛嬛。", "臣妾在。")]


# --- output formats and --context ----------------------------------------------------------------

SCENE = ("第1幕\n"
         "（御花园）\n"
         "甄嬛：好香的梅花。\n"
         "流朱：小姐，有人来了。\n"
         "皇帝：你是谁？\n"
         "甄嬛：奴婢是倚梅园的宫女。\n"
         "皇帝：叫什么名字？\n"
         "甄嬛：贱名恐污了尊耳。\n")


def test_messages_without_context_are_single_exchanges(tmp_path):
    assert cut(tmp_path, SCENE, fmt="messages") == [
        [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "奴婢是倚梅园的宫女。"}],
        [{"role": "user", "content": "叫什么名字？"}, {"role": "assistant", "content": "贱名恐污了尊耳。"}],
    ]


def test_context_keeps_earlier_turns_of_the_scene(tmp_path):
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assistant = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    # One earlier turn: the two other speakers in a row become one user message.
    assert cut(tmp_path, SCENE, fmt="messages", context=1)[0] == [
        user("小姐，有人来了。\n你是谁？"), assistant("奴婢是倚梅园的宫女。")]
    # More context than the scene has: the role's opening line cannot start a conversation, so it goes.
    assert cut(tmp_path, SCENE, fmt="messages", context=9) == [
        [user("小姐，有人来了。\n你是谁？"), assistant("奴婢是倚梅园的宫女。")],
        [user("小姐，有人来了。\n你是谁？"), assistant("奴婢是倚梅园的宫女。"),
         user("叫什么名字？"), assistant("贱名恐污了尊耳。")],
    ]


def test_context_does_not_reach_across_a_stage_direction(tmp_path):
    script = "眉庄：一。\n甄嬛：二。\n（众人入）\n皇后：三。\n甄嬛：四。\n"
    assert cut(tmp_path, script, fmt="messages", context=5)[-1] == [
        {"role": "user", "content": "三。"}, {"role": "assistant", "content": "四。"}]


@pytest.mark.parametrize("fmt, name", [("alpaca", "out.json"), ("messages", "out.jsonl")])
def test_outputs_load_as_training_data(tmp_path, fmt, name):
    out = tmp_path / name
    screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=2 * (fmt == "messages"),
                             fmt=fmt, out=str(out))
    conversations = load_conversations(DataConfig(path=str(out), system_prompt="你是甄嬛。"))
    assert len(conversations) == 2
    assert conversations[1][0] == Message("system", "你是甄嬛。")
    assert conversations[1][-1] == Message("assistant", "贱名恐污了尊耳。")


def test_alpaca_record_fields(tmp_path):
    out = tmp_path / "out.json"
    screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=0, fmt="alpaca",
                             out=str(out))
    assert json.loads(out.read_text(encoding="utf-8"))[0] == {
        "instruction": "你是谁？", "input": "", "output": "奴婢是倚梅园的宫女。", "character": "甄嬛"}


def test_records_name_the_role_and_its_aliases_and_training_reads_them(tmp_path):
    out = tmp_path / "out.jsonl"
    screenplay.write_dataset([write_script(tmp_path, SCENE.replace("甄嬛：贱名", "嬛嬛：贱名"))], role="甄嬛",
                             aliases=["嬛嬛"], context=0, fmt="messages", out=str(out))
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {(r["character"], tuple(r["aliases"])) for r in records} == {("甄嬛", ("嬛嬛",))}
    names = Counter()
    load_conversations(DataConfig(path=str(out)), names=names)
    assert list(names) == ["甄嬛", "嬛嬛"]


# --- the report and the speakers listing ---------------------------------------------------------

def test_report_counts_lines_pairs_and_skips(tmp_path, capsys):
    cut(tmp_path, SCENE)
    report = capsys.readouterr().out
    assert "(UTF-8)" in report
    assert "lines read: 8 (6 dialogue, 1 heading, 1 stage direction); scenes: 1" in report
    assert "speaker lines: 6 by 3 speakers; role 甄嬛: 3 lines" in report
    assert "skipped 1: opens its scene" in report
    assert "pairs written: 2 to" in report


def test_speakers_lists_lines_per_speaker_and_possible_aliases(tmp_path, capsys):
    script = "陵容：姐姐。\n甄嬛：妹妹。\n安陵容：姐姐来了。\n眉庄：来了。\n甄嬛眉庄：妹妹好。\n陵容：嗯。\n"
    screenplay.print_speakers([write_script(tmp_path, script)])
    listing = capsys.readouterr().out
    counts = dict(re.findall(r"^(\S+)\s+(\d+)$", listing, re.MULTILINE))
    assert counts == {"陵容": "2", "甄嬛": "1", "安陵容": "1", "眉庄": "1", "甄嬛眉庄": "1"}
    assert "陵容 / 安陵容" in listing
    assert "甄嬛眉庄" not in listing.splitlines()[-1]  # two names spoken together are a group, not an alias


# --- encodings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, label", [("utf-8-sig", "UTF-8 with BOM"), ("gb18030", "GB18030")])
def test_bom_and_gb18030_files_are_read(tmp_path, capsys, encoding, label):
    path = write_script(tmp_path, SCENE, encoding=encoding)
    out = tmp_path / "out.json"
    screenplay.write_dataset([path], role="甄嬛", aliases=[], context=0, fmt="alpaca", out=str(out))
    assert json.loads(out.read_text(encoding="utf-8"))[0]["output"] == "奴婢是倚梅园的宫女。"
    assert f"({label})" in capsys.readouterr().out


@pytest.mark.parametrize("junk, byte", [
    (bytes(range(256)) * 4, 128),  # not UTF-8 at 0x80, and 0x80 is not GB18030 either
    (b"\xb0\xa1\xb0\xa1\x00\x01\x02\x03", 0),  # GB18030 decodes it, into 啊啊 and control characters
    ("甄嬛：好。\n".encode() + b"\x00\x01\x02binary", 16),  # valid UTF-8 but a NUL is no screenplay
])
def test_binary_junk_is_refused_with_file_and_byte(tmp_path, junk, byte):
    path = tmp_path / "junk.txt"
    path.write_bytes(junk)
    with pytest.raises(DataError, match=rf"junk.txt: not text.*byte {byte}\b"):
        screenplay.read_screenplay([str(path)])


# --- bad input: one clear error, nothing written -------------------------------------------------

def test_role_that_never_speaks_lists_the_closest_speakers(tmp_path):
    path = write_script(tmp_path, "甄嬛：一。\n皇帝：二。\n甄嬛：三。\n甄远道：四。\n")
    with pytest.raises(DataError, match=r"role 甄环 never speaks in .*script.txt; "
                                        r"closest speakers: 甄嬛 \(2 lines\), 甄远道 \(1 lines\)"):
        screenplay.write_dataset([path], role="甄环", aliases=[], context=0, fmt="alpaca",
                                 out=str(tmp_path / "out.json"))
    with pytest.raises(DataError, match=r"alias 莞嫔 never speaks"):
        screenplay.write_dataset([path], role="甄嬛", aliases=["莞嫔"], context=0, fmt="alpaca",
                                 out=str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


def test_a_role_that_never_answers_anyone_is_an_empty_result(tmp_path):
    path = write_script(tmp_path, "第1幕\n甄嬛：一。\n皇帝：二。\n第2幕\n甄嬛：三。\n")
    with pytest.raises(DataError, match=r"no pairs for 甄嬛: none of its 2 lines .*2 opens its scene"):
        screenplay.write_dataset([path], role="甄嬛", aliases=[], context=0, fmt="alpaca",
                                 out=str(tmp_path / "out.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.txt"]


def test_a_script_with_no_dialogue_is_refused(tmp_path):
    path = write_script(tmp_path, "（旁白）\n第1幕\n这里没有对白。\n")
    with pytest.raises(DataError, match=r"no dialogue lines; expected .* \(e.g. .*script.txt:3: 这里没有对白"):
        screenplay.print_speakers([path])


def test_an_existing_out_is_left_untouched(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("my earlier dataset", encoding="utf-8")
    with pytest.raises(DataError, match=r"out.json: already exists; remove it or choose another --out"):
        screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=0,
                                 fmt="alpaca", out=str(out))
    assert out.read_text(encoding="utf-8") == "my earlier dataset"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(DataError, match=r"pairs.json: cannot write \(No space left on device\); nothing was written"):
        screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=0,
                                 fmt="alpaca", out=str(tmp_path / "out" / "pairs.json"))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("context, fmt, message", [
    (2, "alpaca", r"--context needs --format messages"),
    (-1, "messages", r"--context -1: must be 0 or more"),
])
def test_context_settings_are_checked(tmp_path, context, fmt, message):
    with pytest.raises(DataError, match=message):
        screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=context,
                                 fmt=fmt, out=str(tmp_path / "out.json"))


def test_a_missing_script_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.txt: file not found"):
        screenplay.print_speakers([str(tmp_path / "nowhere.txt")])


# --- through the command line --------------------------------------------------------------------

@pytest.mark.parametrize("make_args", [
    lambda path, out: ["speakers", path + ".missing"],
    lambda path, out: ["from-script", path, "--role", "甄环", "--out", out],
    lambda path, out: ["from-script", path, "--role", "甄嬛", "--context", "2", "--out", out],
    lambda path, out: ["from-script", write_script(Path(out).parent, "甄嬛：有人吗？\n", "alone.txt"),
                       "--role", "甄嬛", "--out", out],  # speaks, but answers no one
])
def test_cli_bad_input_is_one_line_and_exit_1(tmp_path, capsys, make_args):
    path, out = write_script(tmp_path, SCENE), str(tmp_path / "out.json")
    assert main(["data", *make_args(path, out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("roletune: error: ") and err.count("\n") == 1
    assert not Path(out).exists()


def test_cli_junk_file_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "junk.txt"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["data", "from-script", str(path), "--role", "甄嬛", "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"roletune: error: .*junk.txt: not text: .*byte 128.*\n", err)


def test_cli_writes_messages(tmp_path):
    out = tmp_path / "out.jsonl"
    assert main(["data", "from-script", write_script(tmp_path, SCENE), "--role", "甄嬛", "--format", "messages",
                 "--context", "2", "--out", str(out)]) == 0
    assert len(load_conversations(DataConfig(path=str(out)))) == 2


# --- agreement with the seed dataset -------------------------------------------------------------

def test_agreement_with_huanhuan_on_episodes_1_to_20(tmp_path, capsys):
    """Pairs cut from 甄嬛传 episodes 1-20 against huanhuan.json, which the seed cut from the whole series.

    Precision: share of our pairs found in huanhuan.json. Recall: share of the huanhuan pairs that
    come from these episodes (prompt and reply are both lines here, or the part of a line before a
    colon, where the seed cut lines) that we make too. Measured: 947 / 995 = 0.952 and 947 / 971 = 0.975.
    """
    if not SCRIPTS.is_dir():
        pytest.skip("../shared/data/scripts (the 甄嬛传 screenplay) is not beside the checkout")
    paths = [str(path) for path in sorted(SCRIPTS.glob("*.txt"))]
    out = tmp_path / "huanhuan-1-20.json"
    screenplay.write_dataset(paths, role="甄嬛", aliases=[], context=0, fmt="alpaca", out=str(out))
    ours = {(r["instruction"], r["output"]) for r in json.loads(out.read_text(encoding="utf-8"))}
    seed = {(r["instruction"], r["output"]) for r in json.loads(HUANHUAN.read_text(encoding="utf-8"))}
    lines = {turn.text for scene in screenplay.read_screenplay(paths).scenes for turn in scene if turn.speaker}
    lines |= {re.split("[：:]", line)[0] for line in lines}
    from_these_episodes = {pair for pair in seed if pair[0] in lines and pair[1] in lines}

    precision = len(ours & seed) / len(ours)
    recall = len(ours & from_these_episodes) / len(from_these_episodes)
    print(f"pairs {len(ours)}, seed pairs from these episodes {len(from_these_episodes)}, "
          f"shared {len(ours & seed)}; precision {precision:.3f}, recall {recall:.3f}")
    assert precision > 0.94 and recall > 0.96


@pytest.mark.parametrize("fmt, name", [("alpaca", "out.jsonl"), ("messages", "out.json")])
def test_the_out_suffix_picks_json_lines_or_one_json_list(tmp_path, fmt, name):
    out = tmp_path / name
    screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=0, fmt=fmt,
                             out=str(out))
    text = out.read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        assert [json.loads(line)["output"] for line in text.splitlines()] == ["奴婢是倚梅园的宫女。", "贱名恐污了尊耳。"]
    else:
        assert [record["messages"][-1]["content"] for record in json.loads(text)] == \
            ["奴婢是倚梅园的宫女。", "贱名恐污了尊耳。"]
    assert len(load_conversations(DataConfig(path=str(out)))) == 2


def test_earlier_turns_come_with_a_note_to_train_each_line_once(tmp_path, capsys):
    screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=2, fmt="messages",
                             out=str(tmp_path / "out.jsonl"))
    assert "train with data.train_on: last so that each line is trained once" in capsys.readouterr().out
    screenplay.write_dataset([write_script(tmp_path, SCENE)], role="甄嬛", aliases=[], context=0, fmt="messages",
                             out=str(tmp_path / "plain.jsonl"))
    assert "data.train_on" not in capsys.readouterr().out
