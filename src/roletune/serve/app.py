"""The OpenAI-compatible HTTP API over an Engine: GET /health, GET /v1/models, POST /v1/chat/completions
(streamed as server-sent events ending in [DONE], or whole), and the web page at / that talks to them.
Errors are OpenAI's JSON shape with a 4xx status; nothing a client sends can produce a 500 with a
traceback."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from roletune.serve.engine import Answer, Busy, Engine

ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def create_app(engine: Engine, *, api_key: str | None = None, allow_origins: list[str] | None = None,
               max_tokens_cap: int = 2048, prompt_tokens_cap: int = 8192) -> FastAPI:
    app = FastAPI(title="roletune", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("roletune.serve").joinpath("page.html").read_text(encoding="utf-8")
    base = next((c.name for c in engine.characters.values() if c.adapter is None), None) if engine.adapted else None

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "a missing or wrong API key: send it as Authorization: Bearer KEY",
                             kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    if allow_origins:  # browsers on other origins may call the API only when the user names them
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/", response_class=HTMLResponse)
    async def web_page():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests": sum(engine.batch_sizes), "batches": len(engine.batch_sizes)}

    @app.get("/v1/models")
    async def models():
        # parent (the base a run's adapter sits on, as vLLM reports LoRA models) and system_prompt are
        # roletune's additions; the web page reads them
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "roletune",
             "parent": base if character.adapter else None, "system_prompt": character.system_prompt}
            for name, character in engine.characters.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        with engine.arriving():
            body = await _json(request)
            character = engine.characters.get(body.get("model")) if isinstance(body.get("model"), str) else None
            if character is None:
                raise BadRequest(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                                      f"{', '.join(engine.characters)}", "model", "not_found_error")
            messages = _messages(body.get("messages"))
            settings = _settings(body, max_tokens_cap)
            ids = engine.prompt_ids(character, messages)
            if len(ids) > prompt_tokens_cap:
                raise BadRequest(400, f"the prompt is longer than this server's cap of {prompt_tokens_cap} tokens",
                                 "messages")
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
            try:
                job = engine.submit(character, ids, lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item),
                                    **settings)
            except Busy:
                raise BadRequest(503, "too many requests are waiting; try again shortly",
                                 kind="server_busy") from None
        created, reply_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        stops = settings["stop"] or []
        if body.get("stream"):
            return StreamingResponse(_events(pieces, job, stops, character.name, reply_id, created),
                                     media_type="text/event-stream")
        text, answer = "", None
        async for item in _drain(pieces, job):
            if isinstance(item, Answer):
                answer = item
            else:
                text += item
        text, cut = _cut_at_stop(text, stops)
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": character.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if cut else answer.finish_reason}],
                "usage": _usage(answer)}

    return app


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    return body


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", "messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(400, f"messages[{index}] must be an object with role and content", "messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(400, f"messages[{index}].role {role!r}: expected one of {', '.join(ROLES)}", "messages")
        if not isinstance(content, str):
            raise BadRequest(400, f"messages[{index}].content must be a string", "messages")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise BadRequest(400, "the last message must be the user's", "messages")
    return checked


def _settings(body: dict, max_tokens_cap: int) -> dict:
    def number(name, kind, low, high):
        value = body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
                or not low <= value <= high:
            raise BadRequest(400, f"{name} must be {'an integer' if kind is int else 'a number'} in [{low}, {high}]",
                             name)
        return kind(value)

    max_tokens = number("max_completion_tokens", int, 1, max_tokens_cap) or number("max_tokens", int, 1, max_tokens_cap)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest(400, "stop must be a string or a list of strings", "stop")
    return {"max_tokens": max_tokens or min(512, max_tokens_cap), "temperature": number("temperature", float, 0, 2),
            "top_p": number("top_p", float, 0, 1), "stop": stop or None, "seed": number("seed", int, 0, 2**63 - 1)}


async def _drain(pieces: asyncio.Queue, job):
    """The engine's pieces as they come, then its Answer; an engine failure becomes a 500 of one line. A
    client that leaves before the Answer cancels the job, so its row stops decoding."""
    finished = False
    try:
        while True:
            item = await pieces.get()
            if isinstance(item, Exception):
                finished = True
                raise BadRequest(500, f"generation failed: {item}", kind="server_error")
            finished = isinstance(item, Answer)
            yield item
            if finished:
                return
    finally:
        job.cancelled = not finished


async def _events(pieces: asyncio.Queue, job, stops: list[str], model: str, reply_id: str, created: int):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    held, keep = "", max((len(s) for s in stops), default=1) - 1  # a stop string may arrive in pieces
    answer, cut = None, False
    try:
        async for item in _drain(pieces, job):
            if isinstance(item, Answer):
                answer = item
                continue
            if cut:
                continue  # the rest of a reply past a stop string: generation ends at it, the client never sees it
            held, cut = _cut_at_stop(held + item, stops)
            ready = held if cut else held[:len(held) - keep] if keep else held
            held = "" if cut else held[len(ready):]
            if ready:
                yield chunk({"content": ready})
        if held:
            yield chunk({"content": held})
        yield chunk({}, "stop" if cut else answer.finish_reason, _usage(answer))
    except BadRequest as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
    yield "data: [DONE]\n\n"


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    found = [text.index(s) for s in stops if s in text]
    return (text[:min(found)], True) if found else (text, False)


def _usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}
