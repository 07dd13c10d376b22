import json

import pytest

from roletune.data import Message
from roletune.data.tokenize import IGNORE_INDEX, Example, mark_trained, tokenize_all, tokenize_conversation

SEED_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"

IM_END, NEWLINE = 151645, 198


def seed_tokens(tokenizer, row):
    """The seed tutorial's process_func, verbatim in effect: prompt ids, reply ids."""
    prompt = (f"<|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n"
              f"{row['instruction'] + row['input']}<|im_end|>\n<|im_start|>assistant\n")
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(row["output"], add_special_tokens=False)["input_ids"])


def test_seed_examples_follow_the_label_rule(shared, qwen_tokenizer):
    rows = json.loads((shared / "data" / "huanhuan.json").read_text(encoding="utf-8"))[:50]
    for row in rows:
        conversation = [Message("system", SEED_SYSTEM), Message("user", row["instruction"]),
                        Message("assistant", row["output"])]
        example = tokenize_conversation(conversation, qwen_tokenizer, "assistant")
        prompt, reply = seed_tokens(qwen_tokenizer, row)
        # The seed's tokens without its final <|endoftext|>, then <|im_end|> and "\n" from the template.
        assert example.input_ids == prompt + reply + [IM_END, NEWLINE]
        assert example.input_ids == list(qwen_tokenizer.apply_chat_template(
            [m.as_dict() for m in conversation], tokenize=True)["input_ids"])
        # Only the reply and its <|im_end|> are trained; the trailing newline is not.
        assert example.labels == [IGNORE_INDEX] * len(prompt) + reply + [IM_END, IGNORE_INDEX]


MULTI_TURN = [Message("system", "s"), Message("user", "第一问"), Message("assistant", "第一答"),
              Message("user", "第二问"), Message("assistant", "第二答")]


def trained_text(example, tokenizer):
    return [tokenizer.decode([t]) for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]


@pytest.mark.parametrize("train_on, expected", [
    ("assistant", "第一答<|im_end|>第二答<|im_end|>"),
    ("last", "第二答<|im_end|>"),
])
def test_which_turns_are_trained(qwen_tokenizer, train_on, expected):
    example = tokenize_conversation(MULTI_TURN, qwen_tokenizer, train_on)
    assert "".join(trained_text(example, qwen_tokenizer)) == expected


def test_train_on_all_trains_every_token(qwen_tokenizer):
    example = tokenize_conversation(MULTI_TURN, qwen_tokenizer, "all")
    assert example.labels == example.input_ids


def test_truncation_counts_and_drops_examples_without_trained_tokens(qwen_tokenizer):
    long_prompt = [Message("user", "风" * 200), Message("assistant", "好")]
    long_reply = [Message("user", "问"), Message("assistant", "答" * 200)]
    short = [Message("user", "问"), Message("assistant", "答")]
    examples, report = tokenize_all([long_prompt, long_reply, short], qwen_tokenizer, 64, "assistant")
    assert (report.read, report.kept, report.truncated, report.dropped_no_target) == (3, 2, 2, 1)
    assert [len(e.input_ids) for e in examples] == [64, len(tokenize_conversation(short, qwen_tokenizer,
                                                                                   "assistant").input_ids)]
    assert report.tokens == sum(len(e.input_ids) for e in examples)
    assert report.trained_tokens == sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_tokenizing_in_one_batch_labels_each_example_as_alone(shared, qwen_tokenizer, train_on):
    rows = json.loads((shared / "data" / "huanhuan.json").read_text(encoding="utf-8"))[:200]
    conversations = [MULTI_TURN] + [[Message("system", SEED_SYSTEM), Message("user", row["instruction"]),
                                     Message("assistant", row["output"])] for row in rows]
    examples, report = tokenize_all(conversations, qwen_tokenizer, 10_000, train_on)
    assert report.kept == len(conversations)
    assert examples == [tokenize_conversation(c, qwen_tokenizer, train_on) for c in conversations]
    assert tokenize_all([], qwen_tokenizer, 64, train_on)[0] == []


def test_preview_marks_the_trained_span(qwen_tokenizer):
    example = tokenize_conversation([Message("user", "你是谁？"), Message("assistant", "我是林小满。")],
                                    qwen_tokenizer, "assistant")
    text = mark_trained(example, qwen_tokenizer)
    assert text.endswith("<|im_start|>assistant\n⟦我是林小满。<|im_end|>⟧\n")
    assert text.count("⟦") == 1


def test_readable_fake_example():
    class Letters:
        """One token per character; enough for mark_trained."""
        def decode(self, ids):
            return "".join(chr(i) for i in ids)
    example = Example([ord(c) for c in "ab12c"], [IGNORE_INDEX, IGNORE_INDEX, ord("1"), ord("2"), IGNORE_INDEX])
    assert mark_trained(example, Letters()) == "ab⟦12⟧c"
