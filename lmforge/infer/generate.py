"""Generation with the same prompt format as training, streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from threading import Thread
from typing import Any, TextIO

import torch

from lmforge.config import LmforgeConfig
from lmforge.data.formats import get_format
from lmforge.data.prepare import adds_bos
from lmforge.errors import LmforgeError
from lmforge.models.load import fit_embeddings_to_tokenizer, load_model, load_tokenizer


def load_for_inference(cfg: LmforgeConfig, lora_model_dir: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """Base model (+ adapter) and tokenizer; the adapter folder's tokenizer wins when it has one."""
    from pathlib import Path

    tokenizer_source = lora_model_dir if lora_model_dir and (Path(lora_model_dir) / "tokenizer_config.json").exists() else None
    tokenizer = load_tokenizer(tokenizer_source or cfg.model.base_model, None if tokenizer_source else cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    model = load_model(cfg.model.base_model, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    if lora_model_dir:
        from peft import PeftModel

        if not (Path(lora_model_dir) / "adapter_config.json").exists():
            raise LmforgeError("no adapter_config.json in the folder", where=f"--lora_model_dir {lora_model_dir}", fix="point it at a training output_dir")
        model = PeftModel.from_pretrained(model, lora_model_dir)
    model.eval()
    return tokenizer, model


def build_prompt(cfg: LmforgeConfig, tokenizer: Any, text: str) -> str:
    """The prompt `text` becomes: the same format as the first dataset's training rows."""
    spec = cfg.data.datasets[0]
    fmt = get_format(spec.type, "datasets[0].type", spec=spec, tokenizer=tokenizer, data=cfg.data)
    prompt = fmt.prompt(text)
    # Training prepends BOS to formats that do not render special tokens themselves; so must we.
    if not getattr(fmt, "renders_special_tokens", False) and adds_bos(tokenizer) and not prompt.startswith(tokenizer.bos_token):
        prompt = tokenizer.bos_token + prompt
    return prompt


def stream_generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0) -> Iterator[str]:
    """Yield decoded text pieces as they are generated; stops at EOS."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **inputs,
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def answer(model: Any, tokenizer: Any, prompt: str, out: TextIO = sys.stdout, **kwargs: Any) -> str:
    pieces = []
    for piece in stream_generate(model, tokenizer, prompt, **kwargs):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)
