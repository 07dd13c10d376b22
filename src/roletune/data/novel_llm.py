"""`data from-novel --llm`: the quotes' speakers asked of an OpenAI-compatible model, for the quotes the rules
leave out (the default) or for every quote (--llm-for all).

The book goes in chunks of about CHUNK_CHARS characters cut at paragraph ends, each led by up to OVERLAP
characters of the text before it for context, so each quote is asked once, in the chunk that holds it. The
model sees the chunk with its quotes numbered ([12]“……”) and must answer one JSON object, quote number ->
speaker or null: {"12": "黛玉", "13": null}. An answer that is no such object, or holds a number it was not
asked, is counted as unparsed and its quotes stay as the rules left them: never an error. Each answer is
cached on disk as it arrives (serve/client.py), so an interrupted run resumes and a rerun asks nothing.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from roletune.data.speech import BY_LLM, QUOTE_MARK, Book, goes_on
from roletune.errors import DataError

CHUNK_CHARS = 1500  # about a thousand tokens of Chinese: room for the answer in any model's context
OVERLAP = 300
RATE = 60  # requests a minute, unless --llm-rate says otherwise
CACHE_SUFFIX = ".llm-cache.jsonl"  # beside --out, unless --llm-cache says otherwise
INSTRUCTIONS = """You attribute the quoted speech of a novel to its speakers. In the text, each quotation is
numbered, as [N]“……”. For each number listed under "Asked", name who says that quotation, as the text names
them. Answer null for a quotation that is no one's speech (a title, a sign, a letter) or whose speaker no reader
could tell. {role}{narrator}Speakers the text names often: {names}.
Answer with one JSON object and nothing else, e.g. {{"12": "林黛玉", "13": null}}."""


@dataclass(frozen=True)
class Asking:
    """--llm URL --llm-model NAME [--llm-for all] [--llm-rate N] [--llm-cache FILE]."""
    url: str
    model: str
    every: bool = False  # every quote, not only those the rules leave out
    rate: float | None = RATE
    cache: str | None = None  # default: beside --out


def attribute(book: Book, asking: Asking, names: list[str], narrator_role: str | None, cache: Path) -> dict:
    """Ask the model for the speakers of the book's unattributed quotes (or of all), set them, and return what
    happened: chunks asked and cached, answers unparsed, quotes attributed, disagreements with the rules."""
    from roletune.serve.client import Endpoint, EndpointError

    url, model = asking.url, asking.model
    endpoint = Endpoint(url, model, cache, key_env=("ROLETUNE_LLM_KEY", "OPENAI_API_KEY"), rate=asking.rate)
    wanted = {index for index, quote in enumerate(book.quotes)
              if (asking.every or not quote.speaker) and not (index and goes_on(book.quotes[index - 1], quote))}
    known = [name for name, _ in Counter(q.speaker for q in book.quotes if q.speaker).most_common(20)]
    system = INSTRUCTIONS.format(
        names=", ".join(known) or "none yet", role=f"Call {names[0]} {names[0]}"
        + (f" (also named {', '.join(names[1:])}). " if names[1:] else ". "),
        narrator=f"The narrator, 我, is {narrator_role}. " if narrator_role else "")
    found = {"url": url, "model": model, "chunks": 0, "cached": 0, "unparsed": 0, "attributed": 0, "disagreed": 0}
    for text, asked in chunks(book, wanted):
        question = f"{text}\n\nAsked: {', '.join(map(str, asked))}"
        try:
            answer = endpoint.ask([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                  max_tokens=16 + 24 * len(asked))
        except EndpointError as error:
            raise DataError(f"--llm {error}; the {found['chunks']} chunks answered so far are kept in {cache}: "
                            "run again to go on (nothing was written)") from None
        found["chunks"] += 1
        speakers = parse(answer, asked)
        if speakers is None:
            found["unparsed"] += 1
            continue
        for index, speaker in speakers.items():
            quote = book.quotes[index]
            if speaker is None:
                continue
            speaker = names[0] if speaker in names or (narrator_role and speaker == "我") else speaker
            ruled = names[0] if quote.speaker in names else quote.speaker  # the role under any of its names
            found["disagreed"] += bool(ruled and ruled != speaker)
            if ruled != speaker:
                quote.speaker, quote.how = speaker, BY_LLM
                found["attributed"] += 1
    found["cached"] = endpoint.cached
    for previous, quote in zip(book.quotes, book.quotes[1:]):  # a speech over paragraphs: one speaker
        if goes_on(previous, quote):
            quote.speaker, quote.how = previous.speaker, previous.how
    return found


def chunks(book: Book, wanted: set[int]) -> list[tuple[str, list[int]]]:
    """The chunks holding wanted quotes: each chunk's text (its context first) and the quotes it asks."""
    numbered, quotes = [], iter(enumerate(book.quotes))
    for paragraph in book.paragraphs:
        pieces = paragraph.split(QUOTE_MARK)
        text, asked = pieces[0], []
        for piece in pieces[1:]:
            index, quote = next(quotes)
            text += f"[{index}]“{quote.text}”" + piece
            asked += [index] if index in wanted else []
        numbered.append((text, asked))
    found, start = [], 0
    while start < len(numbered):
        end, size = start, 0
        while end < len(numbered) and (size < CHUNK_CHARS or end == start):
            size += len(numbered[end][0])
            end += 1
        asked = [index for _, paragraph_asked in numbered[start:end] for index in paragraph_asked]
        if asked:
            first = start
            while first > 0 and sum(len(text) + 1 for text, _ in numbered[first:start]) < OVERLAP:
                first -= 1
            context = "\n".join(text for text, _ in numbered[first:start])[-OVERLAP:]
            body = "\n".join(text for text, _ in numbered[start:end])
            found.append(((f"(before: …{context})\n" if context else "") + body, asked))
        start = end
    return found


def parse(answer: str, asked: list[int]) -> dict[int, str | None] | None:
    """The speakers an answer gives, quote number -> name or None; None when it is not one JSON object of
    asked numbers to names or null (a fenced ```json block, or text around the object, is allowed)."""
    match = re.search(r"\{.*\}", answer or "", re.DOTALL)
    if not match:
        return None
    try:
        given = json.loads(match[0])
    except ValueError:
        return None
    if not isinstance(given, dict):
        return None
    speakers = {}
    for key, name in given.items():
        if not (str(key).strip().isdigit() and int(key) in asked) or not (name is None or isinstance(name, str)):
            return None
        speakers[int(key)] = name.strip() or None if isinstance(name, str) else None
    return speakers
