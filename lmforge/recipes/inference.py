"""`lmforge inference` and `lmforge serve`: answer with the base model, a trained adapter, a merged folder or a GGUF file.

One loader (:func:`lmforge.models.trained.load_for_generation`, the adapter checked against the
base first), one prompt builder (the training format), one generator (sampling, end tokens, the
context window, one generation at a time) behind every front end:

- ``--prompt TEXT``: one answer, streamed;
- prompts on stdin, one per line: each answer printed under its prompt, streamed;
- ``--jsonl``: JSON lines in (``{"prompt": ...}``, ``{"messages": [...]}`` or plain text lines), one JSON line
  out per input, generated in left-padded batches;
- ``--chat``: the terminal chat; ``--gradio``: the web chat; ``serve``: the OpenAI-compatible server.

Status lines go to stderr, so stdout holds only answers (and stays valid JSONL with ``--jsonl``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.infer.generate import Generator, Sampling
from lmforge.infer.prompts import PromptBuilder
from lmforge.device import pick_device, resolve_bf16

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class SamplingFlags:
    """Command-line sampling flags; None means: take the config's value."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


def note(message: str) -> None:
    """A status line on stderr (stdout carries the answers)."""
    print(f"[lmforge] {message}", file=sys.stderr, flush=True)


def sampling_from(cfg: LmforgeConfig, flags: SamplingFlags | None) -> Sampling:
    """Flags over the config's inference keys; the seed defaults to the config's seed."""
    inf = cfg.inference
    base = Sampling(
        max_new_tokens=inf.max_new_tokens, temperature=inf.temperature, top_p=inf.top_p, top_k=inf.top_k,
        repetition_penalty=inf.repetition_penalty, seed=cfg.training.seed,
    )
    flags = flags or SamplingFlags()
    return base.with_overrides(**vars(flags)).check(where="sampling flags / inference keys")


def adapter_dir(cfg: LmforgeConfig, lora_model_dir: str | None) -> str | None:
    """--lora_model_dir, else the config's lora_model_dir (as axolotl reads it for inference)."""
    return lora_model_dir or cfg.adapter.lora_model_dir


def build_generator(cfg: LmforgeConfig, lora_model_dir: str | None = None, model: str | None = None,
                    flags: SamplingFlags | None = None) -> Generator:
    """Load the model (+ checked adapter) and wire it to the training format and the sampling settings."""
    from lmforge.models.trained import load_for_generation

    sampling = sampling_from(cfg, flags)  # bad flags fail before seconds of loading
    source = model or cfg.model.base_model
    if source is None:
        raise LmforgeError("no model to load: this config builds one from scratch", where="base_model",
                           fix="pass --model OUTPUT_DIR (the pretrained model folder)")
    adapter = adapter_dir(cfg, lora_model_dir)
    device = pick_device()
    dtype = torch.bfloat16 if resolve_bf16(cfg.training.bf16, device) else torch.float32
    loaded = load_for_generation(
        source, adapter, dtype=dtype, device=device,
        tokenizer_config=None if model else cfg.model.tokenizer_config, trust_remote_code=cfg.model.trust_remote_code,
        processor=cfg if cfg.model.processor_type else None, mistral_common=cfg.model.tokenizer_use_mistral_common,
    )
    prompts = PromptBuilder.from_config(cfg, loaded.tokenizer, loaded.model)
    name = Path(adapter).name if adapter else Path(str(source).rstrip("/")).name
    note(f"loaded {loaded.source} ({str(dtype).removeprefix('torch.')}, {device.type}); prompts use {prompts.describe}")
    return Generator(loaded.model, loaded.tokenizer, prompts, sampling, truncate_prompt=cfg.inference.truncate_prompt, name=name,
                     processor=loaded.processor)


# -- one prompt, stdin, JSONL -------------------------------------------------------------------------


def answer_stream(gen: Generator, text: str, out: TextIO, where: str = "--prompt", image: str | None = None) -> str:
    if image is not None:  # one user turn: the image, then the text (as the image chats trained on)
        from lmforge.data.images import open_image

        picture = open_image(image, where=f"--image {image}")
        prompt = gen.image_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}])
        stream = gen.stream(prompt, where=where, images=[picture])
    else:
        stream = gen.stream(gen.prompts.single(text), where=where)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return stream.text


def answer_lines(gen: Generator, lines: Iterable[str], out: TextIO) -> list[str]:
    """Prompts one per line: each answer printed under its prompt, a blank line between."""
    answers = []
    for number, line in enumerate(lines, 1):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if answers:
            out.write("\n")
        out.write(f"### prompt {number}: {text}\n")
        answers.append(answer_stream(gen, text, out, where=f"stdin line {number}"))
    return answers


def read_jsonl_prompts(lines: Iterable[str], source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) per non-empty line: a JSON object with prompt or messages, a JSON string, or plain text."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        where = f"{source}:{number}"
        if text[0] in '{["':
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise LmforgeError(f"not valid JSON: {exc.msg}", where=where, fix="one JSON object per line") from exc
        else:
            value = text
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict) or not (isinstance(value.get("prompt"), str) or isinstance(value.get("messages"), list)):
            raise LmforgeError("a line needs a \"prompt\" string or a \"messages\" list", where=where,
                               fix='write {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}')
        yield where, value


def answer_jsonl(gen: Generator, lines: Iterable[str], out: TextIO, source: str = "stdin", batch_size: int = 8) -> int:
    """Batched generation: one JSON line out per line in, in order, with the answer and why it ended."""
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be at least 1, got {batch_size}", where="--batch_size")
    done = 0
    batch: list[tuple[str, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal done
        prompts = []
        for where, record in batch:
            if "messages" in record:
                try:
                    prompts.append(gen.prompts.conversation(record["messages"]))
                except (KeyError, TypeError, ValueError) as exc:
                    raise LmforgeError(f"messages are not OpenAI chat messages ({exc})", where=where,
                                       fix='each message is {"role": "user" | "assistant" | "system", "content": "..."}') from exc
            else:
                prompts.append(gen.prompts.single(record["prompt"]))
        results = gen.complete_batch(prompts, where=[w for w, _ in batch])
        for (_, record), result in zip(batch, results):
            row = {**record, "response": result.text, "finish_reason": result.finish_reason,
                   "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        done += len(batch)
        note(f"{done} answered")
        batch.clear()

    for item in read_jsonl_prompts(lines, source):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return done


def run_inference(
    cfg: LmforgeConfig,
    lora_model_dir: str | None = None,
    prompt: str | None = None,
    *,
    model: str | None = None,
    flags: SamplingFlags | None = None,
    jsonl: bool = False,
    input_path: str | None = None,
    output_path: str | None = None,
    batch_size: int = 8,
    chat: bool = False,
    save_path: str = "chat.jsonl",
    system: str | None = None,
    gradio: bool = False,
    host: str | None = None,
    port: int | None = None,
    share: bool | None = None,
    image: str | None = None,
) -> list[str] | None:
    """Run one of inference's modes (see the module docstring); `image` (--image PATH) goes with --prompt."""
    modes = [name for name, on in (("--prompt", prompt is not None), ("--jsonl", jsonl), ("--chat", chat), ("--gradio", gradio)) if on]
    if len(modes) > 1:
        raise LmforgeError(f"{' and '.join(modes)} cannot be combined", where="inference", fix="pick one mode")
    if input_path is not None and not Path(input_path).is_file():
        raise LmforgeError("input file does not exist", where=f"--input {input_path}")
    if image is not None and prompt is None:
        raise LmforgeError("--image goes with --prompt", where="--image", fix="add --prompt TEXT (in --chat, attach images with /image PATH)")
    if image is not None and not cfg.model.processor_type:
        raise LmforgeError("--image needs an image-text model, and this config has no processor_type", where="--image",
                           fix="use the config the image-text model was trained with (processor_type: AutoProcessor)")
    gen = build_generator(cfg, lora_model_dir, model, flags)
    if chat:
        from lmforge.infer.chat import run_chat

        run_chat(gen, save_path=save_path, system=system)
        return None
    if gradio:
        from lmforge.infer.web import launch

        inf = cfg.inference
        host = host or inf.gradio_server_name or "127.0.0.1"
        if host not in LOCAL_HOSTS:
            note(f"listening on {host}: other machines can reach this chat, and it has no login")
        launch(gen, host=host, port=port or inf.gradio_server_port or 7860,
               share=inf.gradio_share if share is None else share, title=inf.gradio_title,
               max_new_tokens=inf.gradio_max_new_tokens, temperature=inf.gradio_temperature)
        return None
    if prompt is not None:
        return [answer_stream(gen, prompt, sys.stdout, image=image)]
    source = input_path or "stdin"
    handle = open(input_path, encoding="utf-8") if input_path else sys.stdin
    try:
        if jsonl:
            out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
            try:
                answer_jsonl(gen, handle, out, source=source, batch_size=batch_size)
            finally:
                if output_path:
                    out.close()
                    note(f"wrote {output_path}")
            return None
        return answer_lines(gen, handle, sys.stdout)
    finally:
        if input_path:
            handle.close()


def run_serve(cfg: LmforgeConfig, lora_model_dir: str | None = None, *, model: str | None = None,
              flags: SamplingFlags | None = None, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, model_name: str | None = None, max_tokens: int | None = None,
              request_timeout: float | None = None) -> None:
    """`lmforge serve`: the OpenAI-compatible server on host:port until Ctrl-C.

    ``max_tokens`` caps what one request may ask for (default: 1024, or max_new_tokens if larger, so the
    server's own default answer is always allowed); ``request_timeout`` seconds end one generation
    (default 300; 0: no limit).
    """
    from lmforge.infer.server import DEFAULT_MAX_TOKENS, DEFAULT_REQUEST_TIMEOUT, serve

    default_tokens = sampling_from(cfg, flags).max_new_tokens  # checked before seconds of loading
    if max_tokens is None:
        max_tokens = max(DEFAULT_MAX_TOKENS, default_tokens)
    elif max_tokens < 1:
        raise LmforgeError(f"--max_tokens must be at least 1, got {max_tokens}", where="--max_tokens",
                           fix="pass the most tokens one request may ask for, e.g. --max_tokens 1024")
    elif default_tokens > max_tokens:
        raise LmforgeError(f"the default answer length (max_new_tokens {default_tokens}) is above --max_tokens {max_tokens}",
                           where="--max_tokens", fix=f"raise --max_tokens to {default_tokens} or lower max_new_tokens")
    if request_timeout is None:
        request_timeout = DEFAULT_REQUEST_TIMEOUT
    elif request_timeout < 0:
        raise LmforgeError(f"--request_timeout must be 0 (no limit) or more seconds, got {request_timeout:g}",
                           where="--request_timeout", fix="pass seconds, e.g. --request_timeout 300")
    gen = build_generator(cfg, lora_model_dir, model, flags)
    model_id = model_name or gen.name
    if host not in LOCAL_HOSTS:
        note(f"listening on {host}: other machines can reach this server" + ("" if api_key else " and it has no --api_key"))
    note(f"serving {model_id} at http://{host}:{port}/v1 (OpenAI API: /v1/models, /v1/chat/completions, /v1/completions)")
    limit = f"{request_timeout:g} s each" if request_timeout else "no time limit"
    note(f"requests: max_tokens up to {max_tokens} (--max_tokens), {limit} (--request_timeout); Ctrl-C stops")
    serve(gen, model_id, host=host, port=port, api_key=api_key, max_tokens=max_tokens, request_timeout=request_timeout)
