"""`lmforge serve CONFIG`: an OpenAI-compatible HTTP server (FastAPI + uvicorn), on 127.0.0.1 by default.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (messages rendered with the training
format, as ``inference`` does) and ``POST /v1/completions`` (the prompt used as written, as in
OpenAI's API). Both stream with ``"stream": true``: server-sent events in OpenAI's chunk format,
the first chunk carrying the role, then content deltas, a last chunk with ``finish_reason``, and
``data: [DONE]``. Requests run one at a time on the model (the generator's lock); others wait in
arrival order. Unsupported request fields that would change the answer (``n`` > 1, penalties,
``logprobs``, tools) are refused with HTTP 400 rather than ignored.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lmforge.errors import LmforgeError

try:  # at module level: FastAPI resolves the `Request` annotations through this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
except ImportError:  # pragma: no cover - the serve extra is not installed
    FastAPI = None  # type: ignore[assignment,misc]

from lmforge.infer.generate import Generator, GenerationStream, PromptTooLong, Sampling

# Request fields we accept and act on; `model` and `user` are accepted and change nothing.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
           "stream_options", "n", "user", "presence_penalty", "frequency_penalty"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_TEXT = _COMMON | {"prompt", "echo"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sampling(gen: Generator, body: dict[str, Any], allowed: set[str]) -> tuple[Sampling, list[str]]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise BadRequest(f"{key} is not supported (use repetition_penalty)", param=key)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
        sampling = gen.sampling.with_overrides(
            max_new_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"),
            top_k=body.get("top_k"), repetition_penalty=body.get("repetition_penalty"), seed=body.get("seed"),
        ).check(where="request")
    except LmforgeError as exc:
        raise BadRequest(exc.message, param=exc.message.split()[0]) from exc
    except TypeError as exc:
        raise BadRequest(f"a sampling field has the wrong type: {exc}") from exc
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 strings", param="stop")
    return sampling, stop


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"messages[{i}] needs a role and content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts can be read
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p.get("text", "") for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be text", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise BadRequest("messages need at least one user message", param="messages")
    return out


def _usage(stream: GenerationStream) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(gen: Generator, model_id: str, api_key: str | None = None) -> Any:
    """The FastAPI application serving ``gen`` as ``model_id``."""
    if FastAPI is None:
        raise LmforgeError("the server needs fastapi and uvicorn", where="serve", fix="pip install 'lmforge[serve]' (scripts/setup.sh does)")
    app = FastAPI(title=f"lmforge: {model_id}", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(_error_body("invalid API key", "authentication_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Any:
        return JSONResponse(_error_body(str(exc), param=exc.param, code=exc.code), status_code=exc.status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "lmforge"}]}

    def start(prompt: str, sampling: Sampling, stop: list[str]) -> GenerationStream:
        try:
            return gen.stream(prompt, sampling, stop, where="request")
        except PromptTooLong as exc:
            raise BadRequest(exc.message + f" ({exc.fix})", param="messages", code="context_length_exceeded") from exc

    async def events(stream: GenerationStream, chunk: Any, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE bytes for a stream; the generation is cancelled if the client goes away."""
        try:
            first = chunk(None, None)
            if first is not None:
                yield _sse(first)
            async for piece in iterate_in_threadpool(iter(stream)):
                yield _sse(chunk(piece, None))
            yield _sse(chunk(None, stream.finish_reason))
            if include_usage:
                yield _sse({**chunk(None, None, empty=True), "usage": _usage(stream)})
            yield _sse("[DONE]")
        finally:
            stream.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        sampling, stop = _sampling(gen, body, _CHAT)
        try:
            prompt = gen.prompts.conversation(_messages(body))
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from exc
        stream = start(prompt, sampling, stop)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            def chunk(piece: str | None, finish: str | None, empty: bool = False) -> dict[str, Any] | None:
                base = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id}
                if empty:
                    return {**base, "choices": []}
                if piece is None and finish is None:  # the first chunk: the role (OpenAI sends it with empty content)
                    return {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                delta = {"content": piece} if piece is not None else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(stream, chunk, include_usage), media_type="text/event-stream")
        await run_in_threadpool(_drain, stream)
        return {
            "id": ident, "object": "chat.completion", "created": now, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.text},
                         "finish_reason": stream.finish_reason}],
            "usage": _usage(stream),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        sampling, stop = _sampling(gen, body, _TEXT)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (one prompt per request)", param="prompt")
        echo = bool(body.get("echo"))
        stream = start(prompt, sampling, stop)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            def chunk(piece: str | None, finish: str | None, empty: bool = False) -> dict[str, Any] | None:
                base = {"id": ident, "object": "text_completion", "created": now, "model": model_id}
                if empty:
                    return {**base, "choices": []}
                if piece is None and finish is None:
                    return {**base, "choices": [{"index": 0, "text": prompt, "logprobs": None, "finish_reason": None}]} if echo else None
                return {**base, "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}

            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(stream, chunk, include_usage), media_type="text/event-stream")
        await run_in_threadpool(_drain, stream)
        return {
            "id": ident, "object": "text_completion", "created": now, "model": model_id,
            "choices": [{"index": 0, "text": (prompt if echo else "") + stream.text, "logprobs": None,
                         "finish_reason": stream.finish_reason}],
            "usage": _usage(stream),
        }

    return app


def _drain(stream: GenerationStream) -> None:
    for _ in stream:
        pass


def serve(gen: Generator, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "warning") -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    uvicorn.run(create_app(gen, model_id, api_key), host=host, port=port, log_level=log_level)
