"""The client side of the OpenAI-compatible API that `roletune serve` speaks: any such endpoint (a cloud API,
vLLM, or roletune serve) asked for chat completions, by roletune eval's judge and data from-novel's --llm.

Each answer is kept in a cache file as soon as it arrives, keyed by the model and the messages, so an
interrupted run resumes and a repeated one asks nothing. Busy or failing servers (429, 5xx, a dropped
connection) are retried with backoff; requests are spaced to at most `rate` a minute. The standard library
speaks HTTP here: the openai package would be one more dependency for one POST.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

RETRIES = 3
RETRY_CODES = (429, 500, 502, 503, 504)
TIMEOUT_S = 120


class EndpointError(Exception):
    pass


class Endpoint:
    def __init__(self, url: str, model: str, cache: Path, *, key: str | None = None, key_env: tuple[str, ...] = (),
                 rate: float | None = None):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.cache = model, cache
        self.key = key or next((os.environ[name] for name in key_env if os.environ.get(name)), None)
        self.interval = 60 / rate if rate else 0.0
        self.last = 0.0
        self.heard: dict[str, str] = {}
        if cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.heard[record["key"]] = record["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short when a run was killed mid-write: asked again
        self.asked = self.cached = 0

    def ask(self, messages: list[dict], max_tokens: int) -> str:
        """The model's answer to `messages`, greedy, from the cache when it was heard before."""
        key = hashlib.sha256(json.dumps([self.model, messages, max_tokens], ensure_ascii=False).encode()).hexdigest()
        if key in self.heard:
            self.cached += 1
            return self.heard[key]
        answer = self._post({"model": self.model, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
        self.heard[key] = answer
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        with self.cache.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
        return answer

    def _post(self, payload: dict) -> str:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        for attempt in range(RETRIES + 1):
            time.sleep(max(0.0, self.last + self.interval - time.monotonic()))
            self.last = time.monotonic()
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    self.asked += 1
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_CODES or attempt == RETRIES:
                    raise EndpointError(f"{self.url}: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == RETRIES:
                    raise EndpointError(f"{self.url}: {getattr(error, 'reason', error)}") from None
            except (ValueError, KeyError, IndexError, TypeError):
                raise EndpointError(f"{self.url}: not an OpenAI-compatible chat completion") from None
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")
