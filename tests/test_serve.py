"""`lmforge serve` driven by the official `openai` client: models, chat and text completions, streamed and not,
two requests at once, and the raw server-sent events (first chunk carries the role, `data: [DONE]` last).
Then a server that survives its clients: abandoned requests, the max_tokens cap, the request timeout, field
errors that name the field, and Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_helpers import free_port, tiny_infer_config, wait_for_port

openai = pytest.importorskip("openai")

QUESTION = "what is two plus two ?"
OTHER = "what is the sum of one and three ?"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`lmforge serve CONFIG` in its own process, on a free port of 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("serve")
    config = tiny_infer_config(tmp, tiny_model_dir)
    port = free_port()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", str(config), "--port", str(port), "--max_new_tokens", "16",
         "--model_name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/v1", config
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def reference(server: tuple[str, Path]):  # noqa: ANN201
    """The same model and format in this process: what greedy answers must be."""
    from lmforge.config import load_config
    from lmforge.recipes.inference import SamplingFlags, build_generator

    return build_generator(load_config(str(server[1]), [], check_paths=False), flags=SamplingFlags(max_new_tokens=16))


def _client(url: str):  # noqa: ANN202
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_models_and_chat_completion(server, reference) -> None:  # noqa: ANN001
    client = _client(server[0])
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}])
    expected = reference.complete(reference.prompts.conversation([{"role": "user", "content": QUESTION}]))
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text and expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens and reply.usage.completion_tokens == expected.completion_tokens


def test_streamed_chat_completion(server, reference) -> None:  # noqa: ANN001
    client = _client(server[0])
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.complete(reference.prompts.single(QUESTION)).text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_raw_events_start_with_the_role_and_end_with_done(server) -> None:  # noqa: ANN001
    import httpx

    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    with httpx.stream("POST", f"{server[0]}/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_completions(server, reference) -> None:  # noqa: ANN001
    client = _client(server[0])
    raw = "what is one plus one ? answer"
    expected = reference.complete(raw).text  # the prompt is used as written, as in OpenAI's API
    assert client.completions.create(model="tiny", prompt=raw).choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt=raw, stream=True) if c.choices)
    assert streamed == expected
    # echo: the prompt comes first, as the streamed opening chunk or at the head of the answer
    assert client.completions.create(model="tiny", prompt=raw, echo=True).choices[0].text == raw + expected
    chunks = [c for c in client.completions.create(model="tiny", prompt=raw, echo=True, stream=True) if c.choices]
    assert chunks[0].choices[0].text == raw and "".join(c.choices[0].text for c in chunks) == raw + expected


def test_two_concurrent_requests_each_get_their_own_answer(server, reference) -> None:  # noqa: ANN001
    client = _client(server[0])
    questions = [QUESTION, OTHER]
    expected = [reference.complete(reference.prompts.single(q)).text for q in questions]
    assert expected[0] != expected[1]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": questions[i]}], stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(0), results.get(1)] == expected


def test_bad_requests_get_openai_errors(server) -> None:  # noqa: ANN001
    client = _client(server[0])
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "one " * 300}])
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], n=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], top_p=3)


# -- a server that survives its clients ---------------------------------------------------------------------------

LONG_CAP = 30000  # --max_tokens of the long server: far more tokens than any test waits for
LONG_TIMEOUT = 6  # --request_timeout of the long server, seconds


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 32k-token window whose end-of-text logit is always 0 while the best other one is above
    it: greedy answers never end by themselves, so a huge request holds the model until something stops it."""
    import torch
    from conftest import build_tiny_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("endless-llama")
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                               max_position_embeddings=32768))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _start(config: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`lmforge serve CONFIG FLAGS` on a free port of 127.0.0.1, its stdout and stderr into ``log``."""
    port = free_port()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(config), "--port", str(port), *flags],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    wait_for_port(port, proc=proc)
    return proc, port


@pytest.fixture(scope="module")
def long_server(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("serve-long")
    log = tmp / "server.log"
    proc, port = _start(tiny_infer_config(tmp, endless_model_dir), log, "--max_tokens", str(LONG_CAP),
                        "--request_timeout", str(LONG_TIMEOUT))
    try:
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        proc.wait(30)


def _served_in(url: str) -> float:
    """Seconds a short request takes to be answered (waiting for the model included)."""
    import httpx

    started = time.monotonic()
    reply = httpx.post(f"{url}/completions", json={"prompt": "what is", "max_tokens": 2}, timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    return time.monotonic() - started


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_an_abandoned_huge_request_frees_the_server_for_the_next(long_server, stream: bool) -> None:  # noqa: ANN001
    """The client asks for tens of thousands of tokens and leaves after a second; the next request is answered
    within 2 s of it leaving, long before the request timeout would have freed the model."""
    import httpx

    url = long_server[0]
    huge = {"prompt": "what is", "max_tokens": LONG_CAP, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/completions", json=huge, timeout=120) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
            time.sleep(1)
        # leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json=huge, timeout=httpx.Timeout(120, read=1.0))  # gives up after 1 s
    assert _served_in(url) < 2.0


def test_an_api_key_server_refuses_a_missing_key_and_still_frees_an_abandoned_stream(
        endless_model_dir: Path, tmp_path: Path) -> None:
    """--api_key: 401 without the bearer token; with it, a streamed client that leaves still frees the model at once."""
    import httpx

    proc, port = _start(tiny_infer_config(tmp_path, endless_model_dir), tmp_path / "server.log", "--max_tokens",
                        str(LONG_CAP), "--request_timeout", str(LONG_TIMEOUT), "--api_key", "s3cret")
    try:
        url, key = f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer s3cret"}
        for wrong in ({}, {"Authorization": "Bearer guess"}):
            refused = httpx.post(f"{url}/completions", json={"prompt": "what is", "max_tokens": 2}, headers=wrong)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        with httpx.stream("POST", f"{url}/completions", headers=key, timeout=120,
                          json={"prompt": "what is", "max_tokens": LONG_CAP, "stream": True}) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
            time.sleep(1)
        started = time.monotonic()
        reply = httpx.post(f"{url}/completions", json={"prompt": "what is", "max_tokens": 2}, headers=key, timeout=120)
        assert reply.status_code == 200 and time.monotonic() - started < 2.0
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_request_timeout_ends_a_long_request_and_the_queue_moves_on(long_server) -> None:  # noqa: ANN001
    client = _client(long_server[0])
    started = time.monotonic()
    reply = client.completions.create(model="tiny", prompt="what is", max_tokens=LONG_CAP)
    took = time.monotonic() - started
    assert reply.choices[0].finish_reason == "length"  # documented: the answer ends as at a token limit
    assert 0 < reply.usage.completion_tokens < LONG_CAP and reply.choices[0].text
    assert LONG_TIMEOUT - 0.5 < took < LONG_TIMEOUT + 20
    assert _served_in(long_server[0]) < 5.0
    assert f"reached --request_timeout {LONG_TIMEOUT} s" in long_server[1].read_text()


def test_max_tokens_above_the_cap_is_refused_at_once(long_server, server) -> None:  # noqa: ANN001
    client = _client(long_server[0])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens is {LONG_CAP + 1}, above this server's limit of {LONG_CAP}") as caught:
        client.completions.create(model="tiny", prompt="what is", max_tokens=LONG_CAP + 1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match=f"max_completion_tokens is {LONG_CAP + 1}, above"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                       max_completion_tokens=LONG_CAP + 1)
    # The default cap, 1024 (the fixture's --max_new_tokens 16 is below it): 100000000 never reaches the model.
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match="max_tokens is 100000000, above this server's limit of 1024"):
        _client(server[0]).chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=100000000)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_tokens", "lots", 'max_tokens must be an integer, got "lots"'),
    ("max_tokens", -5, "max_tokens must be at least 1, got -5"),
    ("max_tokens", 2.5, "max_tokens must be an integer, got 2.5"),
    ("max_tokens", True, "max_tokens must be an integer, got true"),
    ("max_completion_tokens", 0, "max_completion_tokens must be at least 1, got 0"),
    ("temperature", "hot", 'temperature must be a number, got "hot"'),
    ("temperature", -1, "temperature must be 0 (greedy) or more, got -1"),
    ("top_p", 3, "top_p must be in (0, 1], got 3"),
    ("top_k", -1, "top_k must be 0 (off) or more, got -1"),
    ("top_k", "many", 'top_k must be an integer, got "many"'),
    ("seed", "x", 'seed must be an integer, got "x"'),
    ("n", "two", 'n must be an integer, got "two"'),
    ("stop", 5, "stop must be a string or a list of up to 4 strings"),
    ("stream", "yes", 'stream must be true or false, got "yes"'),
    ("stream_options", 1, "stream_options must be an object"),
    ("repetition_penalty", 0, "repetition_penalty must be above 0 (1 is off), got 0"),
    ("presence_penalty", "none", 'presence_penalty must be a number, got "none"'),
])
def test_a_bad_field_gets_a_400_naming_the_field_sent(server, field: str, value: object, message: str) -> None:  # noqa: ANN001
    import httpx

    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], field: value}
    reply = httpx.post(f"{server[0]}/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["message"].startswith(message) and "max_new_tokens" not in error["message"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_a_busy_server_at_once_with_one_line(endless_model_dir: Path, tmp_path: Path, sig: int) -> None:
    """With a streamed and a non-streamed generation running, the server exits within 2 s, printing one line
    (not uvicorn's tracebacks), and both clients get a clean end."""
    import httpx

    log = tmp_path / "server.log"
    proc, port = _start(tiny_infer_config(tmp_path, endless_model_dir), log, "--max_tokens", str(LONG_CAP))
    url = f"http://127.0.0.1:{port}/v1/completions"
    huge = {"prompt": "what is", "max_tokens": LONG_CAP}
    results: dict[str, object] = {}
    generating = threading.Event()

    def streamed() -> None:
        with httpx.stream("POST", url, json={**huge, "stream": True}, timeout=60) as response:
            lines = []
            for line in response.iter_lines():
                generating.set()
                lines.append(line)
            results["streamed"] = [line for line in lines if line][-1]

    def whole() -> None:
        results["whole"] = httpx.post(url, json=huge, timeout=60).json()

    clients = [threading.Thread(target=streamed), threading.Thread(target=whole)]
    try:
        clients[0].start()
        assert generating.wait(60)
        clients[1].start()
        time.sleep(0.5)  # the second request waits in the queue by now
        before = log.read_text().splitlines()
        started = time.monotonic()
        proc.send_signal(sig)
        proc.wait(30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    for client in clients:
        client.join(30)
    after = log.read_text().splitlines()[len(before):]
    assert took <= 2.0, f"{took:.1f} s to stop"
    assert len(after) <= 3 and len(after) == 1 and "server stopped" in after[0], after
    assert proc.returncode == 0
    assert results.get("streamed") == "data: [DONE]"
    assert results["whole"]["choices"][0]["finish_reason"] == "length"


def test_serve_flags_are_checked_before_loading(tmp_path: Path) -> None:
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.recipes.inference import SamplingFlags, run_serve

    cfg = load_config(str(tiny_infer_config(tmp_path, tmp_path / "no-model-here")), [], check_paths=False)
    with pytest.raises(LmforgeError, match=r"max_new_tokens 16\) is above --max_tokens 8"):
        run_serve(cfg, flags=SamplingFlags(max_new_tokens=16), max_tokens=8)
    with pytest.raises(LmforgeError, match="--request_timeout must be 0"):
        run_serve(cfg, request_timeout=-1)
