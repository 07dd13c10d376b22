"""Identity and break detection on hand-written replies, Chinese and English."""
import pytest

from roletune.persona.detect import break_reason, claims_ai, in_character, language, names_from_system_prompt

ZHEN = ["甄嬛", "嬛嬛", "Zhen Huan"]


@pytest.mark.parametrize("reply", [
    "我是甄嬛，家父是大理寺少卿甄远道。",
    "臣妾甄嬛，参见皇上。",
    "本宫是甄嬛，不是什么人工智能。",
    "I am Zhen Huan, not an AI, whatever you think.",
    "嬛嬛在此，皇上万福。",
])
def test_replies_that_name_the_character_and_claim_no_ai_are_in_character(reply):
    assert in_character(reply, ZHEN)


@pytest.mark.parametrize("reply", [
    "我是通义千问，由阿里云开发的超大规模语言模型。",
    "我是甄嬛，其实也是一个AI助手。",
    "I am Qwen, a large language model created by Alibaba Cloud.",
    "I'm an AI language model, but I can play Zhen Huan for you.",
    "作为一个人工智能，我扮演甄嬛。",
    "皇上，臣妾告退。",  # in voice, but never says who she is
])
def test_replies_that_claim_an_ai_or_name_no_one_are_not(reply):
    assert not in_character(reply, ZHEN)


@pytest.mark.parametrize("reply", [
    "人工智能？本宫听不懂你在说什么。",  # the word, not a claim
    "ChatGPT是何人？宫里没有这个人。",
    "I am not an assistant, I am a keeper of this lighthouse.",
    "我可不是什么语言模型，我是林小满。",
])
def test_mentions_and_denials_are_no_claims(reply):
    assert not claims_ai(reply)


@pytest.mark.parametrize("reply, reason", [
    ("说实话，我是一个人工智能语言模型。", "claims to be an AI"),
    ("As an AI, I do not have a family.", "claims to be an AI"),
    ("好的！一加一等于二。还有什么我可以帮您的吗？", "speaks as an assistant"),
    ("Sure, the capital of France is Paris. How can I help you further?", "speaks as an assistant"),
    ("Sure. The capital of France is Paris, a city on the Seine.", "left the character's language"),
    ("放肆！本宫岂是你能随意差遣的？", None),
    ("你这话好生奇怪，本宫便是本宫。", None),
])
def test_a_zh_character_breaks_by_claim_voice_or_language(reply, reason):
    assert break_reason(reply, "zh") == reason


def test_an_en_character_may_answer_in_english():
    assert break_reason("The capital of France? Paris, of course. Why do you ask a keeper of lights?", "en") is None
    assert break_reason("I'm here to help! Paris is the capital.", "en") == "speaks as an assistant"


def test_the_character_language_is_the_script_of_its_lines():
    assert language(["臣妾甄嬛，参见皇上。", "OK"]) == "zh"
    assert language(["Elementary, my dear Watson.", "甄嬛"]) == "en"


@pytest.mark.parametrize("system, names", [
    ("现在你要扮演皇帝身边的女人--甄嬛", ["甄嬛"]),
    ("你是守灯人林小满。", ["守灯人林小满", "林小满", "小满"]),
    ("You are Sherlock Holmes, a detective in London.", ["Sherlock Holmes", "Sherlock", "Holmes"]),
    ("Answer briefly.", []),
    (None, []),
])
def test_names_are_read_from_the_system_prompt(system, names):
    assert names_from_system_prompt(system) == names


def test_configured_names_come_first_then_the_datas_then_the_system_prompt_then_none():
    from roletune.persona import character_names

    configured = (["甄嬛", "嬛嬛"], "eval.persona.names")
    assert character_names(["甄嬛", "嬛嬛"], ["林小满"], "你是守灯人林小满。") == configured
    assert character_names([], ["甄嬛", "嬛嬛"], "你是守灯人林小满。") == (["甄嬛", "嬛嬛"], "the training data")
    assert character_names([], [], "现在你要扮演皇帝身边的女人--甄嬛") == (["甄嬛"], "the system prompt")
    assert character_names([], [], None) == ([], "none found (set eval.persona.names)")
