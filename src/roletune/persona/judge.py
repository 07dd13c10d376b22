"""An optional judge for the persona score: any OpenAI-compatible endpoint (a cloud API, vLLM, or
`roletune serve`) rates each held-out reply 1-5 for staying in character, by RUBRIC (docs/evaluation.md
shows it). Never required: without --judge nothing here runs.

Each judgment is kept in a cache file beside eval.json as soon as it arrives, keyed by the judge model,
the rubric and the exchange, so an interrupted or repeated eval asks again only what it never heard. An
answer with no score in it is counted as unparsed, never an error; an endpoint that does not answer is
retried with backoff, then reported in eval.json while the rest of the eval stands.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

RUBRIC = """You judge one reply in a role-play. The character: {character}

Rate how well the reply stays in character, from 1 to 5:
5: fully in character: speaks as the character would, in their voice, and never as an AI or assistant
4: in character, with small lapses of voice or knowledge
3: partly in character: generic, or the voice wavers
2: mostly out of character: an assistant's manner, or another persona
1: out of character: says it is an AI, a model or an assistant, or ignores the role

Answer with the score alone, as: Score: N"""
SCORE = re.compile(r"(?:score|评分|得分)\s*[:：]?\s*([1-5])(?![\d.])|^\s*([1-5])\s*(?:/\s*5)?\s*$|\b([1-5])\s*/\s*5\b",
                   re.I | re.M)
RETRIES = 3
CACHE_NAME = "judge_cache.jsonl"


def parse(answer: str) -> int | None:
    """The 1-5 score in a judge's answer (Score: 4, 评分：4, 4/5, or 4 alone), or None."""
    found = SCORE.search(answer or "")
    return int(next(g for g in found.groups() if g)) if found else None


class Judge:
    def __init__(self, url: str, model: str, character: str | None, cache: Path, key: str | None = None):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.cache = model, cache
        self.key = key or os.environ.get("ROLETUNE_JUDGE_KEY") or os.environ.get("OPENAI_API_KEY")
        self.rubric = RUBRIC.format(character=character or "the one the conversation sets")
        self.heard = {}
        if cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                self.heard[record["key"]] = record["answer"]
        self.asked = 0

    def rate(self, pairs: list[tuple[str, str]]) -> dict:
        """Scores for (prompt, reply) pairs, in [0, 1] ((score - 1) / 4), with what was parsed."""
        scores, unparsed, cached = [], 0, 0
        for prompt, reply in pairs:
            key = hashlib.sha256(json.dumps([self.model, self.rubric, prompt, reply]).encode()).hexdigest()
            if key in self.heard:
                cached += 1
            else:
                self.heard[key] = self._ask(prompt, reply)
                with self.cache.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"key": key, "answer": self.heard[key]}, ensure_ascii=False) + "\n")
            score = parse(self.heard[key])
            unparsed += score is None
            scores.append(score)
        parsed = [(s - 1) / 4 for s in scores if s is not None]
        return {"judge_score": sum(parsed) / len(parsed) if parsed else None, "scores": scores,
                "parsed": len(parsed), "unparsed": unparsed, "cached": cached}

    def _ask(self, prompt: str, reply: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 16, "messages": [
            {"role": "system", "content": self.rubric},
            {"role": "user", "content": f"Prompt: {prompt}\nReply: {reply}"}]}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        for attempt in range(RETRIES + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=120) as response:
                    self.asked += 1
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                if error.code not in (429, 500, 502, 503, 504) or attempt == RETRIES:
                    raise JudgeError(f"{self.url}: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == RETRIES:
                    raise JudgeError(f"{self.url}: {getattr(error, 'reason', error)}") from None
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"{self.url}: not an OpenAI-compatible chat completion") from None
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")


class JudgeError(Exception):
    pass
