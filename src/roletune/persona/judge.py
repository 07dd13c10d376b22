"""An optional judge for the persona score: any OpenAI-compatible endpoint (a cloud API, vLLM, or
`roletune serve`) rates each held-out reply 1-5 for staying in character, by RUBRIC (docs/evaluation.md
shows it). Never required: without --judge nothing here runs.

Each judgment is kept in a cache file beside eval.json as soon as it arrives, keyed by the judge model,
the rubric and the exchange, so an interrupted or repeated eval asks again only what it never heard. An
answer with no score in it is counted as unparsed, never an error; an endpoint that does not answer is
retried with backoff, then reported in eval.json while the rest of the eval stands.
"""
from __future__ import annotations

import re
from pathlib import Path

from roletune.serve.client import Endpoint

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
CACHE_NAME = "judge_cache.jsonl"


def parse(answer: str) -> int | None:
    """The 1-5 score in a judge's answer (Score: 4, 评分：4, 4/5, or 4 alone), or None."""
    found = SCORE.search(answer or "")
    return int(next(g for g in found.groups() if g)) if found else None


class Judge:
    def __init__(self, url: str, model: str, character: str | None, cache: Path, key: str | None = None):
        self.endpoint = Endpoint(url, model, cache, key=key, key_env=("ROLETUNE_JUDGE_KEY", "OPENAI_API_KEY"))
        self.rubric = RUBRIC.format(character=character or "the one the conversation sets")

    def rate(self, pairs: list[tuple[str, str]]) -> dict:
        """Scores for (prompt, reply) pairs, in [0, 1] ((score - 1) / 4), with what was parsed."""
        scores, cached = [], self.endpoint.cached
        for prompt, reply in pairs:
            scores.append(parse(self.endpoint.ask([{"role": "system", "content": self.rubric},
                                                   {"role": "user", "content": f"Prompt: {prompt}\nReply: {reply}"}],
                                                  max_tokens=16)))
        parsed = [(s - 1) / 4 for s in scores if s is not None]
        return {"judge_score": sum(parsed) / len(parsed) if parsed else None, "scores": scores,
                "parsed": len(parsed), "unparsed": scores.count(None), "cached": self.endpoint.cached - cached}
