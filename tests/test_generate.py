import json
import os
import pty
import signal
import sys
import time

import pytest

from roletune import decoding, generate
from roletune.cli import main
from roletune.errors import DataError, RunError

from conftest import LIGHTHOUSE_SYSTEM

IM_END = 151645
QUESTION = "第3个问题：今天海上风大吗？"


@pytest.fixture(scope="module")
def session(trained_run):
    return decoding.load_session(str(trained_run), device="cpu")


def greedy(session, tokens=24):
    return decoding.decoding_config(session, greedy=True, max_new_tokens=tokens)


def test_session_reuses_what_training_used(session, trained_run):
    assert session.system_prompt == LIGHTHOUSE_SYSTEM
    assert session.has_adapter
    assert session.tokenizer.chat_template == (trained_run / "chat_template.jinja").read_text(encoding="utf-8")


def test_a_session_answers_through_the_fused_adapter_and_as_pefts_forward_does(session, trained_run):
    """load_session gives the adapter roletune's fused branches (decoding's cheaper forward); fused=False, as
    merge asks, keeps peft's. The same greedy answers either way."""
    def fused_layers(model) -> int:
        return sum(type(m).__name__.startswith("Fused") for m in model.modules())

    plain = decoding.load_session(str(trained_run), device="cpu", fused=False)
    assert fused_layers(session.model) == 14 and fused_layers(plain.model) == 0  # 2 layers x 7 projections
    conversations = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "你好"}]]
    want = [r.text for r in decoding.answer_all(plain, conversations, greedy(plain))]
    assert [r.text for r in decoding.answer_all(session, conversations, greedy(session))] == want


def test_decoding_follows_the_generation_config_and_stops_at_end_of_turn(session):
    config = decoding.decoding_config(session)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == \
        (True, 0.7, 0.8, 20, 1.05)
    assert IM_END in config.eos_token_id and 151643 in config.eos_token_id
    override = decoding.decoding_config(session, temperature=0.2)
    assert override.temperature == 0.2


def test_tuned_answer_stops_at_end_of_turn(session):
    (reply,) = decoding.answer_batch(session, [[{"role": "user", "content": QUESTION}]], greedy(session))
    assert reply.stopped and reply.tokens < 24
    assert reply.text.endswith("灯塔照常亮着。")


def test_batched_generation_keeps_order_and_matches_one_at_a_time(session):
    prompts = [[{"role": "user", "content": q}] for q in
               [QUESTION, "你好", "第10个问题：今天海上风大吗？", "Tell me about the lighthouse, please, at length."]]
    config = greedy(session, 12)
    batched = decoding.answer_all(session, prompts, config, batch_size=4)
    single = [decoding.answer_batch(session, [p], config)[0] for p in prompts]
    assert [r.text for r in batched] == [r.text for r in single]


def test_generate_file_resumes_and_keeps_order(session, tmp_path):
    prompts = [{"id": i, "prompt": f"第{i}个问题：今天海上风大吗？"} for i in range(5)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    config = greedy(session, 12)
    assert generate.generate_file(session, config, str(source), str(full), batch_size=2, echo=lambda *_: None) == 5
    # An interrupted run: two answers written, then a torn third line.
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    part.write_text(lines[0] + lines[1] + lines[2][:10], encoding="utf-8")
    assert generate.generate_file(session, config, str(source), str(part), batch_size=2, echo=lambda *_: None) == 3
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    assert [json.loads(line)["id"] for line in lines] == [0, 1, 2, 3, 4]
    assert generate.generate_file(session, config, str(source), str(full), echo=lambda *_: None) == 0


def test_generate_refuses_an_output_of_other_prompts(session, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("一\n二\n", encoding="utf-8")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "别的", "response": "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(RunError, match="line 1 does not answer prompt 1"):
        generate.generate_file(session, greedy(session), str(source), str(other))


def test_malformed_prompt_file_names_file_and_line(tmp_path, trained_run, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "好"}\n{"prompt": \n', encoding="utf-8")
    code = main(["compare", str(trained_run), "--prompts", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("roletune: error: ") and "prompts.jsonl: line 2: invalid JSON" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    from roletune.data.prompts import read_prompts
    with pytest.raises(DataError, match="wrong.jsonl: line 1: field messages: the last turn must be the user's"):
        read_prompts(str(wrong))


def test_compare_writes_both_columns_and_they_differ(trained_run, tmp_path, capsys):
    out = tmp_path / "compare.jsonl"
    code = main(["compare", str(trained_run), "--prompt", QUESTION, "--prompt", "你好", "--out", str(out),
                 "--device", "cpu", "--max-new-tokens", "12"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == [QUESTION, "你好"]
    assert all(set(r) == {"prompt", "base", "tuned"} for r in rows)
    assert rows[0]["base"] != rows[0]["tuned"] and rows[0]["tuned"].endswith("灯塔照常亮着。")
    assert "base" in printed and "tuned" in printed
    assert main(["compare", str(trained_run), "--prompt", "x", "--out", str(out)]) == 1  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_chat_prompt_answers_once(trained_run, capsys):
    assert main(["chat", str(trained_run), "--prompt", QUESTION, "--greedy", "--device", "cpu",
                 "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip().endswith("灯塔照常亮着。")


def test_history_is_trimmed_to_the_budget(session):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"第{i}个问题" * 5}, {"role": "assistant", "content": "好" * 20}]
    history.append({"role": "user", "content": "最后"})
    kept = generate.fit_history(session, history, budget=80)
    assert kept[-1]["content"] == "最后" and kept[0]["role"] == "user" and len(kept) < len(history)
    assert generate.fit_history(session, history, budget=10_000) == history


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a roletune run, an adapter folder or a model" in capsys.readouterr().err


@pytest.mark.slow
def test_interactive_chat_through_a_pseudo_terminal(trained_run):
    """Drive `roletune chat` as a person would: type, read the streamed reply, /system, /reset, /exit."""
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes the chat program on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "roletune", "chat", str(trained_run), "--greedy",
                                  "--device", "cpu", "--max-new-tokens", "24"])
    transcript = b""

    def read_until(marker: bytes, timeout=120):
        import select

        nonlocal transcript
        deadline = time.time() + timeout
        while marker not in transcript:
            left = deadline - time.time()
            assert left > 0 and select.select([fd], [], [], left)[0], transcript.decode(errors="replace")
            try:
                transcript += os.read(fd, 4096)
            except OSError:
                break
        return transcript

    def send(line: str, expect: bytes):
        os.write(fd, line.encode() + b"\n")
        read_until(expect)

    read_until(b"you> ")
    send(QUESTION, "灯塔照常亮着。".encode())
    read_until(b"you> ")
    send("/system 你是另一个人。", "(system prompt: 你是另一个人。)".encode())
    send("/reset", b"(history cleared)")
    send("/exit", b"")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert transcript.count(b"you> ") >= 3


def test_a_base_model_that_cannot_be_found_is_one_line(trained_run, tmp_path, capsys):
    import shutil

    import yaml

    moved = tmp_path / "run"
    shutil.copytree(trained_run, moved)
    record = yaml.safe_load((moved / "roletune.yaml").read_text(encoding="utf-8"))
    record["model"]["path"] = str(tmp_path / "gone")
    (moved / "roletune.yaml").write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")
    assert main(["chat", str(moved), "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its base model {tmp_path / 'gone'} (model.path in its roletune.yaml)" in err[0]
    assert "no such folder; pass --base-model PATH_OR_ID" in err[0]


def test_compare_caps_replies_as_the_runs_sample_answers_did(trained_run, tmp_path, capsys):
    import shutil

    import yaml
    from transformers import AutoTokenizer

    from roletune.run_dir import reply_cap

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = yaml.safe_load((run / "roletune.yaml").read_text(encoding="utf-8"))
    record["eval"]["max_new_tokens"] = 2
    (run / "roletune.yaml").write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")
    assert reply_cap(str(run), 512) == 2 and reply_cap(str(tmp_path), 512) == 512
    out = tmp_path / "compare.jsonl"
    assert main(["compare", str(run), "--prompt", "第3个问题：今天海上风大吗？", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(run)
    row = json.loads(out.read_text(encoding="utf-8"))
    assert all(0 < len(tokenizer(row[side], add_special_tokens=False)["input_ids"]) <= 2 for side in ("base", "tuned"))


def test_chat_commands_help_and_a_mistyped_command_never_reach_the_model(session, monkeypatch):
    asked = []
    monkeypatch.setattr(generate, "answer_batch", lambda *args, **kwargs: asked.append(args) or [])
    typed = iter(["/help", "/sytem 你是别人。", "/system 你是别人。", KeyboardInterrupt, "/reset", KeyboardInterrupt,
                  KeyboardInterrupt, "never read"])

    def read(_):
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    shown = []
    generate.chat(session, greedy(session), read=read, write=shown.append, who="the tuned model")
    assert shown[0] == "roletune chat with the tuned model; /help lists the commands"
    assert shown[1] == generate.CHAT_HELP and shown[2] == f"(no command /sytem)\n{generate.CHAT_HELP}"
    assert shown[3] == "(system prompt: 你是别人。)" and shown[4] == "\n(Ctrl-C again, or Ctrl-D, to quit)"
    assert shown[5:] == ["(history cleared)", "\n(Ctrl-C again, or Ctrl-D, to quit)"]  # the second Ctrl-C quits
    assert asked == [] and next(typed) == "never read"


@pytest.mark.slow
def test_ctrl_c_in_a_pseudo_terminal_stops_the_reply_and_ctrl_d_quits(trained_run):
    """The base model (random weights, sampling) would talk for 4000 tokens: Ctrl-C stops that reply alone,
    the chat goes on, and Ctrl-D at the prompt ends it."""
    import select

    pid, fd = pty.fork()
    if pid == 0:
        # As a terminal starts it: a test run started in the background (CI) ignores SIGINT, and an ignored
        # signal stays ignored across exec, so Ctrl-C would never reach the chat.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "roletune", "chat", str(trained_run), "--base",
                                  "--device", "cpu", "--max-new-tokens", "4000"])
    transcript = b""

    def read_until(marker: bytes, after: int = 0, timeout=120) -> int:
        """Read the terminal until `marker` shows up past byte `after`; the position just past it."""
        nonlocal transcript
        deadline = time.time() + timeout
        while (found := transcript.find(marker, after)) < 0:
            left = deadline - time.time()
            assert left > 0 and select.select([fd], [], [], left)[0], transcript.decode(errors="replace")
            transcript += os.read(fd, 4096)
        return found + len(marker)

    status = None
    try:
        seen = read_until(b"you> ")
        assert "roletune chat with the base model, its adapter off (--base)".encode() in transcript
        os.write(fd, b"/help\n")
        seen = read_until(b"you> ", read_until(b"/reset", seen))
        os.write(fd, QUESTION.encode() + b"\n")
        asked = read_until(QUESTION.encode(), seen)
        while len(transcript) < asked + 60:  # the reply is streaming
            assert select.select([fd], [], [], 120)[0], transcript.decode(errors="replace")
            transcript += os.read(fd, 4096)
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"you> ", read_until(b"(reply stopped)", asked))
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:  # a failed check: the chat must not outlive the test
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
