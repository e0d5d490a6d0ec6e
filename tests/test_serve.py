"""`lmforge serve` driven by the official `openai` client: models, chat and text completions, streamed and not,
two requests at once, and the raw server-sent events (first chunk carries the role, `data: [DONE]` last)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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
