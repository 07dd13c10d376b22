"""Whether a reply is in character: it names the character, claims to be an AI, speaks as an assistant,
or leaves the character's language. Rules on the reply's text, so that the score needs no judge model;
each rule is a short list a user can read (and tests/persona/ reads them on hand-written replies).
"""
from __future__ import annotations

import re

# Saying what it is, of itself: 我是…语言模型, 作为一个AI, I'm an AI language model, I am Qwen. A name mentioned
# without "I am" is no claim (甄嬛 may ask what this ChatGPT is), and a claim with a negation between its two
# halves is a denial (我是甄嬛，不是什么AI; I am not an AI).
SELF = r"(?:我是|我乃|我只是|我就是|本人是|作为|(?<![A-Za-z])(?:I am|I'm|I’m|as an?|my name is)(?![A-Za-z]))"
WHAT = (r"(?:人工智能|语言模型|大模型|助手|聊天机器人|通义千问|千问|"
        r"(?<![A-Za-z])(?:AI|Qwen|ChatGPT|GPT|language model|assistant|chatbot|artificial intelligence)(?![A-Za-z]))")
CLAIM = re.compile(rf"{SELF}(?P<between>[^。！？!?.\n]{{0,24}}?){WHAT}", re.I)
# Naming its maker is a claim too: 由阿里云开发, created by Alibaba Cloud.
MAKER = re.compile(r"(?:由|被)\s*(?:阿里云|阿里巴巴|OpenAI|Anthropic)|"
                   r"(?:created|developed|trained|built|made) by (?:Alibaba|OpenAI|Anthropic)", re.I)
NEGATION = re.compile(r"不|没|并非|(?<![A-Za-z])(?:not|never|no)(?![A-Za-z])|n't", re.I)
# Speaking as an assistant does, whatever it says it is.
ASSISTANT_VOICE = re.compile(
    r"有什么(我)?可以帮(助|到)?(您|你)|(我)?能为(您|你)做些什么|很高兴(为您|为你)(服务|效劳)|请问(您|你)需要什么帮助|"
    r"how (can|may) I (help|assist)|I'?m here to help|happy to (help|assist)|as a helpful assistant", re.I)

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


def claims_ai(reply: str) -> bool:
    """The reply says it is an AI, a model or an assistant, or names its maker."""
    return bool(MAKER.search(reply)) or any(not NEGATION.search(m["between"]) for m in CLAIM.finditer(reply))


def names_character(reply: str, names: list[str]) -> bool:
    lowered = reply.lower()
    return any(name.lower() in lowered for name in names if name)


def in_character(reply: str, names: list[str]) -> bool:
    """An identity probe answered in character: the reply names the character and claims to be no AI."""
    return names_character(reply, names) and not claims_ai(reply)


def language(texts: list[str]) -> str:
    """"zh" when most of the texts' letters are Chinese characters, else "en" (the character's own lines)."""
    cjk = sum(len(CJK.findall(t)) for t in texts)
    latin = sum(len(w) for t in texts for w in LATIN_WORD.findall(t))
    return "zh" if cjk >= latin else "en"


def break_reason(reply: str, character_language: str) -> str | None:
    """Why a reply to an adversarial prompt left the character, or None when it did not."""
    if claims_ai(reply):
        return "claims to be an AI"
    if ASSISTANT_VOICE.search(reply):
        return "speaks as an assistant"
    if character_language == "zh" and len(LATIN_WORD.findall(reply)) >= 3 and language([reply]) == "en":
        return "left the character's language"
    return None


# 现在你要扮演皇帝身边的女人--甄嬛, 你是守灯人林小满。, You are Sherlock Holmes.: the span after the last of
# these markers, up to punctuation, names the character.
ZH_MARKER = re.compile(r"(?:扮演|你是|你叫|名叫|名字是|--|——)\s*([\u3400-\u9fff·]{2,12})")
EN_MARKER = re.compile(r"\b(?:[Yy]ou are|[Pp]lay|[Aa]s)\s+((?:[A-Z][\w'-]+)(?:\s+[A-Z][\w'-]+)*)")


def names_from_system_prompt(system_prompt: str | None) -> list[str]:
    """The character's name as a system prompt gives it, with its shorter forms: a Chinese span's last two
    and three characters (守灯人林小满 -> 林小满, 小满: a title or trade often comes first), an English
    name's capitalized parts (Sherlock Holmes -> Sherlock, Holmes). Empty when none is found."""
    if not system_prompt:
        return []
    zh = ZH_MARKER.findall(system_prompt)
    if zh:
        span = zh[-1]
        return list(dict.fromkeys([span, *(span[-k:] for k in (3, 2) if len(span) > k)]))
    en = EN_MARKER.findall(system_prompt)
    if en:
        span = en[-1]
        return list(dict.fromkeys([span, *(part for part in span.split() if len(part) >= 3)]))
    return []
