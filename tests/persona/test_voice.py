"""The voice classifier on synthetic styles: it separates two voices, and says so when it cannot."""
import random

import pytest

from roletune.persona.voice import VoiceClassifier


def lines(style: str, count: int, seed: int) -> list[str]:
    draw = random.Random(seed)
    subjects = ["灯塔", "海风", "渔船", "潮水", "星光", "礁石", "雾气", "海鸥"]
    if style == "courtly":  # 本宫, 罢了, 臣妾: a palace voice
        return [f"本宫瞧着{draw.choice(subjects)}，倒也{draw.choice(['罢了', '有趣', '可怜'])}。"
                f"臣妾{draw.choice(['告退', '明白'])}。" for _ in range(count)]
    return [f"哈哈，{draw.choice(subjects)}真{draw.choice(['好看', '厉害', '大'])}啊！"
            f"咱们{draw.choice(['走吧', '去看看'])}~" for _ in range(count)]  # a cheerful, plain voice


def test_two_voices_are_told_apart_and_replies_scored_by_theirs():
    voice = VoiceClassifier(lines("courtly", 60, 1), lines("plain", 60, 2))
    assert voice.cv_accuracy > 0.9
    assert voice.score(lines("courtly", 10, 3)) > 0.7 > 0.3 > voice.score(lines("plain", 10, 4))


def test_one_voice_on_both_sides_is_chance():
    same = lines("courtly", 120, 5)
    voice = VoiceClassifier(same[:60], same[60:])
    assert voice.cv_accuracy == pytest.approx(0.5, abs=0.15)
    assert voice.score(lines("courtly", 10, 6)) == pytest.approx(0.5, abs=0.15)


def test_too_few_lines_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 2 lines a side at least, got 1 and 5"):
        VoiceClassifier(["本宫乏了。"], lines("plain", 5, 7))
