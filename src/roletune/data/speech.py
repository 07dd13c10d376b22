"""Who says each quote of a novel: quoted speech found, and attributed by the speech tags around it.

Rules, the same for every novel (nothing here knows a particular one):
- Speech is quoted: “…”, 「…」 or "…". Quotes inside a quote (‘…’, 『…』) stay part of it. A speech running
  over several paragraphs leaves its quote open at each paragraph's end and opens one again at the next:
  the pieces are one quote.
- A line is a paragraph; `第N回` / `第N章` / `第N节` / `Chapter N` headings (and each new file) start a chapter.
- Who speaks is what a speech tag says: a clause right before the quote that ends in a speech verb or a colon
  after one (甄嬛笑道：“……”, 母亲对我说：“……”), else the clause or sentence right after it (“……”皇帝道。).
  The speaker is the known name opening the tag. A tag with no subject of its own (……，便笑道：“……”) takes
  the name opening its sentence (or the sentence before, whose subject it goes on with); right after a quote
  (宝玉道：“……”又问：“……”) it goes on with that quote's speaker.
- Known names are those tags give twice, or once when the narration names them three times or more, with the
  role and its aliases: a name seen once in a tag is too likely a fragment of narration. A sentence's subject
  may also be a word that opens several clauses of the narration (邢夫人听说，笑道). 他 / 她 name no one; 我 is
  the role with --narrator.
- A quote no tag attributes is left out and counted: precision first, since a line put in the wrong
  mouth teaches the wrong character.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from roletune.data.screenplay import NUMERAL, line_kind, paths_list
from roletune.data.text import read_text
from roletune.errors import DataError

OPENERS = {"“": "”", "「": "」", '"': '"'}
NESTED = {"“": "”", "「": "」"}  # an opener of the same kind inside a quote nests (some editions nest “ in “)
CHAPTER = re.compile(rf"^(第\s*{NUMERAL}\s*[回章节卷]|chapter\s+([0-9]+|[ivxlc]+)\b)", re.IGNORECASE)
# Speech verbs a tag ends with, longest first so 笑道 is taken whole.
VERBS = sorted("""道 说 问 答 回 叹 骂 喊 叫 嚷 哭 笑 劝 啐 喝 念 说道 问道 答道 回道 叹道 骂道 喊道 叫道 嚷道 哭道
    笑道 劝道 啐道 喝道 念道 想道 说着 笑说 笑问 回说 回答 答应 应道 告诉 嘱咐 吩咐 称赞 抱怨 低声道 冷笑道
    冷笑 大叫 大笑道 命 报 让 传报 回话 said asked replied answered cried whispered shouted called""".split(),
               key=len, reverse=True)
ENGLISH_VERBS = [verb for verb in VERBS if verb.isascii()]
# A colon closes a tag when the clause holds one of these anywhere (母亲对我说：, 贾母因问黛玉道：); single
# characters like 回 or 笑 are too common in narration for that.
TAG_VERBS = [verb for verb in VERBS if len(verb) > 1 or verb in "道说问"]
# Clause endings that hold a speech verb and say nothing: heard said, as was said, "be it told".
NOT_TAGS = ("听说", "听见说", "虽说", "却说", "话说", "且说", "再说", "不说", "难道说", "说了")
# Words between a speaker and the verb (王夫人忙笑道, 她笑着说, 冷冷道), longest first. A clause opening with
# one has no subject of its own (便起身道): its sentence's subject speaks.
ADVERBS = sorted("""忙 便 又 因 也 乃 遂 才 方 就 都 还 只 却 先 再 正 亦 仍 即 则 亦 连忙 急忙 赶忙 忙忙 笑着 微笑着
    含笑 微笑 冷冷 淡淡 悄悄 低声 高声 大声 轻声 柔声 沉声 不禁 不觉 一面 一边 听了 听说 见了 看了 点头 摇头 叹了口气
    笑了笑 也笑 又笑 便笑 因笑 忙笑 方笑 接着 随即 于是 大怒 大惊 大喜 纳罕 暗喜 罕然 诧异 惊讶 叹息 哭着 哽咽 愤愤
    慌忙 陪笑 赔笑 含泪 垂泪 拍手 跌脚 不免 且 且兼 then also""".split(), key=len, reverse=True)
# Words that open a tag's clause in place of a subject (心下想道, 不过说): never a name.
NOT_NAMES = ("心下", "心中", "心里", "心内", "不过", "只是", "但是", "因此", "所以", "如今", "方才", "刚才", "自然",
             "果然", "虽然", "只得", "不免", "便是", "原来", "也是", "又是", "一面", "一边", "口中", "口里", "嘴里",
             "谁知", "半日", "半晌", "良久", "一时", "登时", "少时", "次日", "后来")
# Words in a tag that make its subject several people (尤氏、凤姐都忙说): no one speaker.
TOGETHER = ("、", "都", "一齐", "齐声", "同声", "俱", "大家", "众")
# What may open a tag's clause before its subject (只见王夫人笑道).
PREFACES = sorted("只见 只听 只听得 忽见 忽听 忽闻 又见 却见 于是 这里 那里 当下 此时 这时 一时 这 那 and".split(),
                  key=len, reverse=True)
PRONOUNS = {"我", "他", "她", "他们", "她们", "我们", "你", "I", "he", "she", "He", "She"}
FIRST_PERSON = {"我", "I"}
CLAUSE_END = "，。！？；：,.!?;:…—"
SENTENCE_END = "。！？!?…"
QUOTE_MARK = "\u0001"  # a quote's place in the narration around it
MAX_NAME = 4  # characters of a Chinese name in a tag (欧阳克, 王夫人, 凤姐儿); English names are words
LONGEST_NAME = 40  # characters, English names included, that a clause's opening is looked up by
MIN_TAGS = 2  # tags that must give a name before it is one
MIN_MENTIONS = 3  # or times the narration must name it, with one tag
GOES_ON = "the speaker of the quote before it, going on"
BY_LLM = "the LLM"


@dataclass
class Quote:
    text: str
    where: str  # file:line
    chapter: int
    paragraph: int  # counted over all books
    before: str  # the paragraph's narration before the quote, earlier quotes as QUOTE_MARK
    after: str  # and after it
    open_end: bool = False  # left open at the paragraph's end: the speech goes on in the next paragraph
    speaker: str | None = None
    how: str = ""  # the tag that attributed it, or why none did


@dataclass
class Book:
    quotes: list[Quote]
    paragraphs: list[str]  # every paragraph's narration, quotes as QUOTE_MARK
    encodings: dict[str, str]


def is_novel(paths: list[str]) -> bool:
    """Whether the files read as a novel (speech in quotes) rather than a screenplay (`角色：台词`): by which
    kind of line is more common."""
    quoted = dialogue = 0
    for path in paths:
        for line in read_text(Path(path), "text")[0].splitlines():
            if any(opener in line for opener in OPENERS):
                quoted += 1
            elif line_kind(line.strip()) == "dialogue":
                dialogue += 1
    return quoted > dialogue


def read_book(paths: list[str], names: list[str], narrator_role: str | None) -> Book:
    quotes, paragraphs, encodings, chapter = [], [], {}, 0
    for path in paths:
        text, encodings[path] = read_text(Path(path), "novel text")
        chapter += 1
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.replace("\ufeff", "").strip()
            if CHAPTER.match(line):
                chapter += 1
            if not line:
                continue
            narration, found = split_quotes(line)
            for before, quoted, after, open_end in found:
                quotes.append(Quote(quoted, f"{path}:{number}", chapter, len(paragraphs), before, after, open_end))
            paragraphs.append(narration)
    if not quotes:
        raise DataError(f"{paths_list(paths)}: no quoted speech; expected “…”, 「…」 or \"…\" around what is said")
    known = tag_names(quotes)
    lexicon = Lexicon(_lexicon(known, paragraphs) | set(names), _openers(paragraphs))
    attribute(quotes, lexicon, narrator_role)
    return Book(quotes, paragraphs, encodings)


def split_quotes(line: str) -> tuple[str, list[tuple[str, str, str, bool]]]:
    """The line's narration (each quote as QUOTE_MARK), and each top-level quote with the narration before and
    after it and whether it was left open."""
    spans, start, opener, depth = [], None, None, 0
    for index, char in enumerate(line):
        if opener is None and char in OPENERS:
            start, opener, depth = index, char, 1
        elif opener is not None and char == OPENERS[opener] and (opener != '"' or depth == 1):
            depth -= 1
            if depth == 0:
                spans.append((start, index + 1))
                opener = None
        elif opener in NESTED and char == opener:
            depth += 1
    if opener is not None:
        spans.append((start, len(line)))
    narration, cursor = [], 0
    for begin, end in spans:
        narration += [line[cursor:begin], QUOTE_MARK]
        cursor = end
    narration = "".join(narration + [line[cursor:]])
    found, marks = [], [i for i, c in enumerate(narration) if c == QUOTE_MARK]
    for number, ((begin, end), mark) in enumerate(zip(spans, marks)):
        open_end = number == len(spans) - 1 and opener is not None
        quoted = line[begin + 1:end if open_end else end - 1].strip()
        found.append((narration[:mark], quoted, narration[mark + 1:], open_end))
    return narration, found


def tag_names(quotes: list[Quote]) -> Counter:
    """Every name a speech tag gives, with how often."""
    names = Counter()
    for quote in quotes:
        for clause in (tag_before(quote.before), _tag_after(quote.after)):
            subject = _subject(clause) if clause else ""
            if _looks_like_name(subject) and subject not in PRONOUNS:
                names[subject] += 1
    return names


def _lexicon(known: Counter, paragraphs: list[str]) -> set[str]:
    """The names tags give: MIN_TAGS times or more, or once by a name the narration mentions MIN_MENTIONS
    times (闰土说。, 那原告道：); less those that start with an adverb (便起身) or extend a shorter name
    (黛玉纳罕: 黛玉 wondered)."""
    narration = "\n".join(paragraphs)
    frequent = {name for name, count in known.items() if not name.startswith(tuple(ADVERBS))
                and (count >= MIN_TAGS or narration.count(name) >= MIN_MENTIONS)}
    return {name for name in frequent if not any(name != other and name.startswith(other) for other in frequent)}


def _openers(paragraphs: list[str]) -> set[str]:
    """Names found by how the narration's clauses open, for the subject of a sentence whose tag has none
    (邢夫人听说，笑道：): each 2-character opening of MIN_MENTIONS clauses or more, grown while every clause it
    opens goes on alike (邢夫 -> 邢夫人), unless it opens with a word that is no name."""
    openings = Counter()
    for paragraph in paragraphs:
        for clause in re.split(rf"[{CLAUSE_END}{QUOTE_MARK}]", paragraph):
            text = _strip_prefix(_strip_prefix(clause.strip(), PREFACES), ADVERBS)
            openings.update(text[:length] for length in range(2, MAX_NAME + 1) if len(text) >= length)
    longer = {}  # an opening -> the one a character longer that opens as many clauses, if any
    for opening, count in openings.items():
        if len(opening) > 2 and openings[opening[:-1]] == count:
            longer[opening[:-1]] = opening
    found = set()
    for opening, count in openings.items():
        if len(opening) != 2 or count < MIN_MENTIONS or opening.startswith((*NOT_NAMES, *VERBS, *ADVERBS)):
            continue
        while opening in longer:
            opening = longer[opening]
        if _looks_like_name(opening):
            found.add(opening)
    return found


@dataclass(frozen=True)
class Lexicon:
    names: set[str]  # the names tags give, with the role's
    openers: set[str]  # names found by how clauses open, for a sentence's subject only


def attribute(quotes: list[Quote], lexicon: Lexicon, narrator_role: str | None) -> None:
    """Set each quote's speaker and how it was found; a speech over several paragraphs is one speaker's."""
    for index, quote in enumerate(quotes):
        previous = quotes[index - 1] if index else None
        if previous and goes_on(previous, quote):
            quote.speaker, quote.how = previous.speaker, previous.how
            continue
        speaker, how = _attribute_one(quote, lexicon, previous if previous and previous.paragraph == quote.paragraph
                                      else None)
        if how == GOES_ON:
            pass  # the earlier quote's speaker, already resolved
        elif speaker in FIRST_PERSON and narrator_role:
            speaker = narrator_role
        elif speaker in PRONOUNS:
            speaker, how = None, "a pronoun names no one"
        quote.speaker, quote.how = speaker, how


def goes_on(previous: Quote, quote: Quote) -> bool:
    """Whether `quote` is the next paragraph of a speech left open."""
    return previous.open_end and quote.paragraph == previous.paragraph + 1 and not quote.before.strip()


def _attribute_one(quote: Quote, lexicon: Lexicon, previous: Quote | None) -> tuple[str | None, str]:
    """Who speaks the quote by its tags; `previous` is the quote before it in its paragraph, if any."""
    clause = tag_before(quote.before)
    if clause is not None and _together(clause):
        return None, "several speak at once"
    if clause is not None:
        name = _named(clause, lexicon.names)
        if name:
            return name, "a tag before it"
        if not _has_own_subject(clause):  # 便笑道, 便起身道: the sentence's subject speaks
            name = _sentence_subject(quote.before, lexicon.names | lexicon.openers)
            if name:
                return name, "the sentence before it"
            own = quote.before.split(QUOTE_MARK)[-1].strip()
            opening = re.split(rf"[{CLAUSE_END}]", own, maxsplit=1)[0]
            if previous and not any(mark in own for mark in SENTENCE_END) and not _has_own_subject(opening + "道"):
                # 宝玉笑道：“……”又问黛玉：“……”: a sentence with no subject right after a quote goes on with
                # its speaker
                return (previous.speaker, GOES_ON) if previous.speaker else (None, "a tag naming no known speaker")
        return None, "a tag naming no known speaker"
    clause = _tag_after(quote.after)
    if clause is not None and _together(clause):
        return None, "several speak at once"
    if clause is not None:
        name = _named(clause, lexicon.names)
        return (name, "a tag after it") if name else (None, "a tag naming no known speaker")
    return None, "no speech tag beside it"


def tag_before(before: str) -> str | None:
    """The clause right before a quote, if it is a speech tag: it ends in a speech verb, or in a colon after
    a clause holding one (母亲对我说：)."""
    text = before.rstrip()
    colon = text.endswith(("：", ":"))
    clause = re.split(rf"[{CLAUSE_END}{QUOTE_MARK}]", text.rstrip("：:，, "))[-1].strip()
    if not clause or clause.endswith(NOT_TAGS):
        return None
    if clause.endswith(tuple(VERBS)) or (colon and any(verb in clause for verb in TAG_VERBS)):
        return clause
    return None


def _tag_after(after: str) -> str | None:
    """The clause or the sentence right after a quote, if it ends in a speech verb (宝玉笑道。 母亲说着，……
    我惶恐着，站起来说。), or in English the clause with the verb first (said Darcy)."""
    clause = re.split(rf"[{CLAUSE_END}{QUOTE_MARK}]", after.lstrip(), maxsplit=1)[0].strip()
    inverted = re.fullmatch(rf"({'|'.join(ENGLISH_VERBS)})\s+(.+)", clause)
    if inverted:
        return f"{inverted[2]} {inverted[1]}"
    sentence = re.split(rf"[{SENTENCE_END}{QUOTE_MARK}]", after.lstrip(), maxsplit=1)[0].strip(" ，,")
    for tag in (clause, sentence):  # 母亲说着，便向房外看。 / 我惶恐着，站起来说。
        if tag.endswith(tuple(VERBS)) and not tag.endswith(NOT_TAGS):
            return tag
    return None


def _subject(clause: str) -> str:
    """A tag's clause without its preface, its verb and the adverbs before the verb: the speaker as written
    when the clause is only name, adverbs and verb; empty when it has no subject of its own (便笑道)."""
    text = _strip_prefix(clause, PREFACES)
    while True:
        word = next((w for w in (*VERBS, *ADVERBS) if text.endswith(w)), None)
        if word is None:
            return text
        text = text[:-len(word)].rstrip()


def _together(clause: str) -> bool:
    """Whether a tag's subject is several people: 尤氏、凤姐都忙说, 众人齐声道."""
    subject = clause[:max((clause.rfind(verb) for verb in VERBS), default=len(clause))]
    return any(word in subject for word in TOGETHER)


def _has_own_subject(clause: str) -> bool:
    """Whether a tag's clause names who acts: not when it is only adverbs and a verb (便笑道), or when it opens
    with an adverb (便起身道, 又回头道), going on from its sentence's subject."""
    text = _strip_prefix(clause, PREFACES)
    return bool(_subject(clause)) and not text.startswith((*ADVERBS, *NOT_NAMES))


def _looks_like_name(text: str) -> bool:
    """A tag's subject that can be a name: short, no aspect marker, not opening with a verb or a word that
    is no name, and no adverb in 的 (慢慢的; 周瑞家的 is a name)."""
    if text.isascii():
        return text[:1].isupper() and len(text.split()) <= 3
    return (1 <= len(text) <= MAX_NAME and not any(mark in text for mark in "了着")
            and not text.startswith((*NOT_NAMES, *VERBS)) and not (text.endswith("的") and not text.endswith("家的")))


def _named(clause: str, lexicon: set[str]) -> str | None:
    """The known name or pronoun the clause opens with (after a preface and adverbs), longest first."""
    text = _strip_prefix(_strip_prefix(clause.strip(), PREFACES), ADVERBS)
    for length in range(min(len(text), LONGEST_NAME), 0, -1):
        name = text[:length]
        if (name in lexicon or name in PRONOUNS) and not (name.isascii() and text[length:length + 1].isalpha()):
            return name
    return None


def _sentence_subject(before: str, lexicon: set[str]) -> str | None:
    """The known name opening the sentence a tag ends, or, when that sentence has no subject of its own
    (因答道：), the one opening the sentence before it: Chinese narration drops a subject it goes on with.
    Never across a quote: the sentence after one has a speaker of its own."""
    sentences = re.split(rf"(?<=[{SENTENCE_END}])", before.split(QUOTE_MARK)[-1])
    sentences = [sentence for sentence in sentences if sentence.strip()]
    for sentence in reversed(sentences[-2:]):
        opening = re.split(rf"[{CLAUSE_END}]", sentence.strip(), maxsplit=1)[0]
        name = _named(opening, lexicon)
        if name or _has_own_subject(opening + "道"):
            return name
    return None


def _strip_prefix(text: str, words: list[str]) -> str:
    for word in words:
        if text.startswith(word) and len(text) > len(word):
            return text[len(word):].lstrip()
    return text
