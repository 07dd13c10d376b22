"""Novel text -> a character dataset: the role's quoted speech (speech.py says who says each quote, by rule,
and novel_llm.py by an LLM if asked), each paired with what prompted it.

The prompt of each of the role's lines is the line just before it when another speaker said it (within
PROMPT_REACH paragraphs of the same chapter, no unattributed quote between), else the narration just before it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from roletune.data.conversation import Conversation, Message
from roletune.data.output import render, write_aside
from roletune.data.screenplay import counts, paths_list, print_speaker_counts, suggested_speakers
from roletune.data.speech import BY_LLM, QUOTE_MARK, Book, Quote, goes_on, read_book, tag_before
from roletune.errors import DataError

if TYPE_CHECKING:
    from roletune.data.novel_llm import Asking

PROMPT_REACH = 3  # paragraphs back that a prompt line may be
SAMPLES = 5


# --- the two verbs -------------------------------------------------------------------------------

def print_speakers(paths: list[str], narrator_role: str | None = None) -> None:
    """`roletune data speakers --novel`: who speaks how many quotes, and the quotes no tag attributes."""
    book = read_book(paths, [], narrator_role)
    _print_reading(book)
    print_speaker_counts(Counter(q.speaker for q in book.quotes if q.speaker))


def write_dataset(paths: list[str], *, role: str, aliases: list[str], narrator: bool, context: int, fmt: str,
                  out: str, llm: Asking | None = None) -> None:
    """`roletune data from-novel`: attribute the books' quotes (by rule, then by `llm` if given), pair the role's,
    write them, print a report."""
    target = Path(out)
    if target.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out (nothing was written)")
    if context < 0:
        raise DataError(f"--context {context}: must be 0 or more")
    if context and fmt == "alpaca":
        raise DataError("--context needs --format messages or sharegpt (an alpaca pair has no earlier turns)")
    names = [role, *aliases]
    book = read_book(paths, names, role if narrator else None)
    asked = None
    if llm:
        from roletune.data import novel_llm

        cache = Path(llm.cache or f"{out}{novel_llm.CACHE_SUFFIX}")
        asked = novel_llm.attribute(book, llm, names, role if narrator else None, cache)
    speakers = Counter(q.speaker for q in book.quotes if q.speaker)
    _check_role_speaks(names, speakers, paths, narrator)
    conversations, prompts, skipped = pair(book, set(names), context)
    if not conversations:
        raise DataError(f"no pairs for {role}: none of its {sum(speakers[n] for n in names)} quotes has a line or "
                        f"narration before it ({counts(skipped)}); nothing was written")
    write_aside(target, render(conversations, fmt, lines=target.suffix.lower() == ".jsonl", names=names))
    _print_reading(book)
    if asked:
        print(f"LLM {asked['model']} at {asked['url']}: {asked['chunks']} chunks ({asked['cached']} from the cache), "
              f"{asked['unparsed']} answers unparsed; {asked['attributed']} quotes attributed"
              + (f", {asked['disagreed']} of them against the rules" if asked["disagreed"] else ""))
    print(f"role {' / '.join(names)}: {sum(speakers[n] for n in names)} quotes ("
          + ", ".join(f"{name} {speakers[name]}" for name in names) + ")")
    for reason, count in skipped.most_common():
        print(f"  skipped {count}: {reason}")
    print(f"pairs written: {len(conversations)} to {out} ({fmt}; prompted by {counts(prompts)}"
          + (f"; up to {context} earlier turns" if context else "") + ")")
    for conversation in conversations[:SAMPLES]:
        print(f"  {_short(conversation[-2].content)}  ->  {_short(conversation[-1].content)}")


# --- pairing -------------------------------------------------------------------------------------

def pair(book: Book, names: set[str], context: int) -> tuple[list[Conversation], Counter, Counter]:
    """Each of the role's quotes with its prompt: the line just before it when another speaker said it (with up
    to `context` lines before that), else the narration just before it. Returns the conversations, what
    prompted them, and why other quotes of the role were skipped."""
    conversations, seen, prompts, skipped = [], set(), Counter(), Counter()
    quotes = book.quotes
    for index, quote in enumerate(quotes):
        if quote.speaker not in names:
            continue
        if index and goes_on(quotes[index - 1], quote):
            continue  # the rest of a speech whose start has its record
        text = _speech(quotes, index)
        earlier = _earlier_lines(quotes, index, context + 1)
        if earlier and earlier[-1].speaker not in names:
            turns, kind = [*earlier, None], "a line"
        else:
            narration = _narration_before(book, quote)
            if not narration:
                skipped["no line by another speaker and no narration before it"] += 1
                continue
            turns, kind = [narration, None], "narration"
        conversation = _conversation(turns, text, names)
        key = tuple(conversation)
        if key in seen:
            skipped["duplicate of an earlier pair"] += 1
            continue
        seen.add(key)
        prompts[kind] += 1
        conversations.append(conversation)
    return conversations, prompts, skipped


def _speech(quotes: list[Quote], index: int) -> str:
    """The quote, with the paragraphs it goes on into."""
    parts = [quotes[index].text]
    while index + 1 < len(quotes) and goes_on(quotes[index], quotes[index + 1]):
        index += 1
        parts.append(quotes[index].text)
    return "\n".join(parts)


def _earlier_lines(quotes: list[Quote], index: int, limit: int) -> list[Quote]:
    """Up to `limit` attributed quotes running up to this one, in order, without a gap: back to an unattributed
    quote, the chapter's start, or more than PROMPT_REACH paragraphs between two lines."""
    lines, at = [], quotes[index]
    for position in range(index - 1, -1, -1):
        earlier = quotes[position]
        if len(lines) == limit or earlier.chapter != at.chapter or at.paragraph - earlier.paragraph > PROMPT_REACH \
                or not earlier.speaker:
            break
        lines.append(earlier)
        at = earlier
    return lines[::-1]


def _narration_before(book: Book, quote: Quote) -> str:
    """The narration just before the quote: its paragraph's, less the speech tag, else the paragraph before
    when that is narration alone."""
    own = quote.before.split(QUOTE_MARK)[-1]
    tag = tag_before(own)
    if tag:
        own = own.rstrip().rstrip("：:，, ")[:-len(tag)]
    own = own.strip(" ，,：:")
    if own:
        return own
    if quote.paragraph and QUOTE_MARK not in book.paragraphs[quote.paragraph - 1]:
        return book.paragraphs[quote.paragraph - 1]
    return ""


def _conversation(turns: list, reply: str, names: set[str]) -> Conversation:
    """Other speakers (or narration) are the user, the role the assistant; lines in a row on one side joined."""
    messages: list[Message] = []
    for turn in turns:
        if turn is None:
            role, text = "assistant", reply
        elif isinstance(turn, Quote):
            role, text = "assistant" if turn.speaker in names else "user", turn.text
        else:  # narration
            role, text = "user", turn
        if messages and messages[-1].role == role:
            messages[-1] = Message(role, messages[-1].content + "\n" + text)
        elif messages or role == "user":
            messages.append(Message(role, text))
    return messages


# --- reporting -----------------------------------------------------------------------------------

def _check_role_speaks(names: list[str], speakers: Counter, paths: list[str], narrator: bool) -> None:
    """One of the role's names must speak; an alias that never does is only a name tags do not use."""
    if any(speakers[name] for name in names):
        return
    hint = "" if narrator else "; a first-person narrator needs --narrator"
    raise DataError(f"role {' / '.join(names)} never speaks in {paths_list(paths)}; "
                    f"{suggested_speakers(names[0], speakers, 'quotes')} (see roletune data speakers --novel){hint}")


def _print_reading(book: Book) -> None:
    print("read " + ", ".join(f"{path} ({encoding})" for path, encoding in book.encodings.items()))
    attributed = Counter(q.how for q in book.quotes if q.speaker and q.how != BY_LLM)
    by_llm = sum(q.how == BY_LLM for q in book.quotes if q.speaker)
    dropped = Counter(q.how for q in book.quotes if not q.speaker)
    print(f"quotes found: {len(book.quotes)} in {len(book.paragraphs)} paragraphs; attributed by rule: "
          f"{sum(attributed.values())} ({counts(attributed)}); " + (f"by LLM: {by_llm}; " if by_llm else "")
          + f"left out: {sum(dropped.values())}" + (f" ({counts(dropped)})" if dropped else ""))


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
