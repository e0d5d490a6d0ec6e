"""`lmforge serve CONFIG`: an OpenAI-compatible HTTP server (FastAPI + uvicorn), on 127.0.0.1 by default.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (messages rendered with the training
format, as ``inference`` does) and ``POST /v1/completions`` (the prompt used as written, as in
OpenAI's API). Both stream with ``"stream": true``: server-sent events in OpenAI's chunk format,
the first chunk carrying the role, then content deltas, a last chunk with ``finish_reason``, and
``data: [DONE]``. Requests run one at a time on the model (the generator's lock); others wait in
arrival order. Unsupported request fields that would change the answer (``n`` > 1, penalties,
``logprobs``, tools) are refused with HTTP 400 rather than ignored, and so is a field of the wrong type
or range, in OpenAI's error shape with ``param`` naming the field the client sent.

The server survives its clients: a request whose client disconnects is cancelled at the next token,
streamed or not (a queued one never starts); ``max_tokens`` above the server's cap (``--max_tokens``)
is refused with HTTP 400, as OpenAI refuses more than a model supports, rather than clamped
silently; a generation that runs past ``--request_timeout`` seconds ends there with finish_reason
"length", as if it had reached its token limit, keeping the text made so far; and Ctrl-C or
SIGTERM cancels what is running and stops the server in a moment, with one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmforge.errors import LmforgeError

try:  # at module level: FastAPI resolves the `Request` annotations through this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
except ImportError:  # pragma: no cover - the serve extra is not installed
    FastAPI = None  # type: ignore[assignment,misc]
    StreamingResponse = object  # type: ignore[assignment,misc]  # so the classes below still define

from lmforge.infer.generate import Generator, GenerationStream, PromptTooLong, Sampling

# Request fields we accept and act on; `model` and `user` are accepted and change nothing.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
           "stream_options", "n", "user", "presence_penalty", "frequency_penalty"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_TEXT = _COMMON | {"prompt", "echo"}
# The type each field must have when given (null means: the server's default, as in OpenAI's API).
_INTEGERS = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n")
_NUMBERS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOLEANS = ("stream", "echo")
_STRINGS = ("model", "user")

# The most tokens one request may ask for unless `serve --max_tokens` says otherwise: four times the
# default answer (max_new_tokens 256), and about a minute of a 1B model on a CPU, so one client cannot
# hold the queue for the whole context window.
DEFAULT_MAX_TOKENS = 1024
# Seconds one generation may hold the model (counted once it starts, not while it queues).
DEFAULT_REQUEST_TIMEOUT = 300.0


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_types(body: dict[str, Any]) -> None:
    """HTTP 400 naming the first field whose JSON type is wrong (before any comparison could fail on it)."""
    for key in _INTEGERS:
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadRequest(f"{key} must be an integer, got {json.dumps(value)}", param=key, code="invalid_type")
    for key in _NUMBERS:
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadRequest(f"{key} must be a number, got {json.dumps(value)}", param=key, code="invalid_type")
    for key in _BOOLEANS:
        value = body.get(key)
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"{key} must be true or false, got {json.dumps(value)}", param=key, code="invalid_type")
    for key in _STRINGS:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key} must be a string, got {json.dumps(value)}", param=key, code="invalid_type")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest('stream_options must be an object like {"include_usage": true}', param="stream_options",
                         code="invalid_type")


def _sampling(gen: Generator, body: dict[str, Any], allowed: set[str],
              max_tokens_cap: int | None = None) -> tuple[Sampling, list[str]]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    _check_types(body)
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise BadRequest(f"{key} is not supported (use repetition_penalty)", param=key)
    # The field the client sent, so errors name it (the generator calls it max_new_tokens).
    tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(tokens_key)
    if max_tokens is not None and max_tokens_cap is not None and max_tokens > max_tokens_cap:
        raise BadRequest(f"{tokens_key} is {max_tokens}, above this server's limit of {max_tokens_cap} "
                         "(serve --max_tokens sets it)", param=tokens_key, code="invalid_value")
    sampling = gen.sampling.with_overrides(
        max_new_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"),
        top_k=body.get("top_k"), repetition_penalty=body.get("repetition_penalty"), seed=body.get("seed"),
    )
    problems = sampling.problems()
    if problems:
        field, why = problems[0]
        key = tokens_key if field == "max_new_tokens" else field
        raise BadRequest(f"{key} {why}, got {body.get(key)}", param=key, code="invalid_value")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 strings", param="stop")
    return sampling, stop


def _image_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages with ``image_url`` parts (data: URLs) as the processor's template reads them, and the images."""
    from lmforge.data.images import image_chat
    from lmforge.errors import LmforgeError

    try:
        chat = image_chat({"messages": [{**m, "role": "system" if m.get("role") == "developer" else m.get("role")}
                                        for m in messages if isinstance(m, dict)]}, "messages")
    except LmforgeError as exc:
        raise BadRequest(exc.message.replace("lmforge reads images from local files", "this server reads data: URLs only")
                         + (f" ({exc.fix})" if exc.fix else ""), param="messages") from exc
    return chat.messages, chat.images


def _has_image_parts(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"]) for m in messages)


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


class _RequireKey:
    """Answers 401 unless the request carries ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse(_error_body("invalid API key", "authentication_error", code="invalid_api_key"),
                                        status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """SSE of one generation that cancels it however the response ends. Starlette cancels a response whose
    client left while it awaits a send, outside the event generator, so the generator's own ``finally`` would
    wait for the garbage collector while the model went on generating."""

    def __init__(self, stream: GenerationStream, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.generation = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def create_app(gen: Generator, model_id: str, api_key: str | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> Any:
    """The FastAPI application serving ``gen`` as ``model_id``.

    ``max_tokens`` caps what a request may ask for (None: no cap); ``request_timeout`` seconds end a
    generation (None or 0: no limit). ``app.state.cancel_all()`` cancels every request in progress.
    """
    if FastAPI is None:
        raise LmforgeError("the server needs fastapi and uvicorn", where="serve", fix="pip install 'lmforge[serve]' (scripts/setup.sh does)")
    app = FastAPI(title=f"lmforge: {model_id}", docs_url=None, redoc_url=None)
    created = int(time.time())
    # Requests started and not yet answered, so a shutdown can cancel them (weak: a response never sent
    # cannot keep its stream here).
    live: weakref.WeakSet[GenerationStream] = weakref.WeakSet()
    time_limit = request_timeout or None

    def cancel_all() -> int:
        streams = list(live)
        for stream in streams:
            stream.cancel()
        return len(streams)

    app.state.cancel_all = cancel_all

    if api_key is not None:
        # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware relays a streamed
        # body through a task of its own, and a client that left mid-stream then went unnoticed until the
        # request timeout (the generation held the model all that time).
        app.add_middleware(_RequireKey, api_key=api_key)

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

    def start(prompt: str, sampling: Sampling, stop: list[str], images: list[Any] | None = None) -> GenerationStream:
        try:
            stream = gen.stream(prompt, sampling, stop, where="request", time_limit=time_limit, images=images)
        except PromptTooLong as exc:
            raise BadRequest(exc.message + f" ({exc.fix})", param="messages", code="context_length_exceeded") from exc
        live.add(stream)
        return stream

    def finished(stream: GenerationStream) -> None:
        live.discard(stream)
        if stream.timed_out:  # the operator's record of it; the client sees finish_reason "length"
            print(f"[lmforge] a request reached --request_timeout {request_timeout:g} s after "
                  f"{stream.completion_tokens} tokens; its answer ends there (finish_reason \"length\")",
                  file=sys.stderr, flush=True)

    async def events(stream: GenerationStream, head: dict[str, Any], choice: Callable[[str | None, str | None], Any],
                     body: dict[str, Any]) -> AsyncIterator[bytes]:
        """SSE bytes for a stream: each chunk is `head` (id, object, created, model) around `choice(piece, finish)`;
        `choice(None, None)` is the opening chunk (None: no opening chunk). The generation is cancelled if the
        client goes away."""
        try:
            first = choice(None, None)
            if first is not None:
                yield _sse({**head, "choices": [first]})
            async for piece in iterate_in_threadpool(iter(stream)):
                yield _sse({**head, "choices": [choice(piece, None)]})
            yield _sse({**head, "choices": [choice(None, stream.finish_reason)]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": _usage(stream)})
            yield _sse("[DONE]")
        finally:
            stream.cancel()
            finished(stream)

    async def answer(request: Request, stream: GenerationStream) -> None:
        """Generate a non-streamed answer; a client that disconnects meanwhile cancels it at the next token.

        The body has been read, so the next ASGI message is the disconnect: wait for it beside the generation.
        """
        async def cancel_on_disconnect() -> None:
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # noqa: BLE001 - a connection that cannot be read is one the answer cannot reach
                pass
            stream.cancel()

        watcher = asyncio.ensure_future(cancel_on_disconnect())
        try:
            await run_in_threadpool(_drain, stream)
        finally:
            watcher.cancel()
            finished(stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        sampling, stop = _sampling(gen, body, _CHAT, max_tokens)
        images = None
        if getattr(gen, "processor", None) is not None and _has_image_parts(body.get("messages")):  # an image-text model, asked about images
            messages, images = _image_messages(body["messages"])
            prompt = gen.image_prompt(messages)
        else:
            try:
                prompt = gen.prompts.conversation(_messages(body))
            except ValueError as exc:
                raise BadRequest(str(exc), param="messages") from exc
        stream = start(prompt, sampling, stop, images)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            def choice(piece: str | None, finish: str | None) -> dict[str, Any]:
                if piece is None and finish is None:  # the first chunk: the role (OpenAI sends it with empty content)
                    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                return {"index": 0, "delta": {"content": piece} if piece is not None else {}, "finish_reason": finish}

            head = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id}
            return _EventStream(stream, events(stream, head, choice, body))
        await answer(request, stream)
        return {
            "id": ident, "object": "chat.completion", "created": now, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.text},
                         "finish_reason": stream.finish_reason}],
            "usage": _usage(stream),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        sampling, stop = _sampling(gen, body, _TEXT, max_tokens)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (one prompt per request)", param="prompt")
        echo = bool(body.get("echo"))
        stream = start(prompt, sampling, stop)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            def choice(piece: str | None, finish: str | None) -> dict[str, Any] | None:
                if piece is None and finish is None:  # the first chunk: the prompt when echoed, else none
                    return {"index": 0, "text": prompt, "logprobs": None, "finish_reason": None} if echo else None
                return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}

            head = {"id": ident, "object": "text_completion", "created": now, "model": model_id}
            return _EventStream(stream, events(stream, head, choice, body))
        await answer(request, stream)
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
          log_level: str = "warning", max_tokens: int | None = DEFAULT_MAX_TOKENS,
          request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> None:
    """Run the server until Ctrl-C or SIGTERM, which stop it in a moment with one line."""
    import uvicorn

    app = create_app(gen, model_id, api_key, max_tokens=max_tokens, request_timeout=request_timeout)

    class Server(uvicorn.Server):
        stop_signal: int | None = None
        cut_short = 0  # requests in progress when the signal came

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's graceful shutdown waits for every response to finish: cancelling the generations
            # (they stop at their next token, and end with finish_reason "length") makes that a moment.
            # A second Ctrl-C still forces the stop, as in uvicorn.
            if self.stop_signal is None:
                self.stop_signal = sig
                self.cut_short = app.state.cancel_all()
                # Tasks that uvicorn may cancel from here on are expected, not errors to print.
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            if self.stop_signal is None:  # stopped by its owner, not by a signal: return as uvicorn does
                await super().shutdown(sockets)
                return
            name = "Ctrl-C" if self.stop_signal == signal.SIGINT else signal.Signals(self.stop_signal).name
            cut = self.cut_short
            print(f"[lmforge] {name}: server stopped" + (f" ({cut} request(s) in progress ended early)" if cut else ""),
                  file=sys.stderr, flush=True)
            await super().shutdown(sockets)
            # Every response is sent: the process ends here, as SIGTERM's default action would end it, without
            # the interpreter's teardown of the model and some 3,000 modules (1 to 10 s of garbage collection
            # on a busy 2-core machine), and without waiting for a generation that cannot stop between tokens
            # (a long prompt's prefill).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=1)
    Server(config).run()
