"""Generation for every front end (one prompt, batches, terminal chat, web UI, server): streamed or batched.

One :class:`Generator` per loaded model. It owns a lock, so however many callers there are (gradio
sessions, concurrent HTTP requests), one generation runs on the model at a time and requests queue
in arrival order; a stream's tokens can never interleave with another's. Streaming runs
``model.generate`` in a worker thread that hands token ids over a queue; the caller decodes them
incrementally, cuts at stop strings, and can cancel (the worker stops at the next token).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def with_overrides(self, **values: Any) -> "Sampling":
        """A copy with every value that is not None replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for each out-of-range value; the server names the request field instead."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(("max_new_tokens", "must be at least 1"))
        if self.temperature < 0:
            problems.append(("temperature", "must be 0 (greedy) or more"))
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", "must be in (0, 1]"))
        if self.top_k < 0:
            problems.append(("top_k", "must be 0 (off) or more"))
        if self.repetition_penalty <= 0:
            problems.append(("repetition_penalty", "must be above 0 (1 is off)"))
        return problems

    def check(self, where: str = "sampling") -> "Sampling":
        problems = self.problems()
        if problems:
            key, why = problems[0]
            raise LmforgeError(f"{key} {why}, got {getattr(self, key)}", where=where, fix=f"change {key}")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            # Explicit values: a model's generation_config may carry its own top_k/top_p defaults.
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (an end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class PromptTooLong(LmforgeError):
    """A prompt that does not fit the context window (the server answers it with HTTP 400)."""


def context_window(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _IdStreamer:
    """A ``generate`` streamer that forwards generated token ids over a queue (the first put is the prompt)."""

    def __init__(self) -> None:
        self.ids: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.ids.put(int(token))

    def end(self) -> None:
        self.ids.put(None)


class _Cancel:
    """Stopping criterion: stop every row as soon as the event is set, or once ``deadline`` (monotonic) passes."""

    def __init__(self, event: threading.Event, deadline: float | None = None) -> None:
        self.event = event
        self.deadline = deadline
        self.expired = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.deadline is not None and not self.event.is_set() and time.monotonic() >= self.deadline:
            self.expired = True
            self.event.set()
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class GenerationStream:
    """Text pieces of one answer as they are generated; afterwards ``text``, ``finish_reason`` and token counts.

    Iterate it once. ``cancel()`` (or leaving the loop early) stops the generation at the next token.
    ``time_limit`` (seconds, counted from when the model is free for it, not while it queues) stops it the
    same way; the answer then ends with finish_reason "length" and ``timed_out`` is set.
    """

    def __init__(self, generator: "Generator", ids: list[int], sampling: Sampling, stop: list[str],
                 time_limit: float | None = None, images: dict[str, Any] | None = None) -> None:
        self._generator = generator
        self._images = images  # an image prompt's pixel tensors (Generator.encode_images)
        self._time_limit = time_limit
        self.timed_out = False
        self._ids = ids
        self._sampling = sampling
        self._stop = [s for s in stop if s]
        self._cancel = threading.Event()
        self.text = ""
        self.finish_reason = "length"
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        gen = self._generator
        streamer = _IdStreamer()
        worker = threading.Thread(target=self._run, args=(streamer,), daemon=True, name="lmforge-generate")
        worker.start()
        tokens: list[int] = []
        emitted = 0  # characters of the decoded answer already handed out
        hold = max((len(s) for s in self._stop), default=1) - 1  # a stop string may still be forming
        stop_ids = set(gen.stop_token_ids)
        try:
            while True:
                token = streamer.ids.get()
                if token is None:
                    break
                self.completion_tokens += 1
                if token in stop_ids:
                    self.finish_reason = "stop"
                    break
                tokens.append(token)
                text = gen.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # a multi-byte character still incomplete
                    continue
                cut = self._find_stop(text, emitted)
                if cut is not None:
                    self._cancel.set()
                    break
                safe = len(text) - hold
                if safe > emitted:
                    self.text = text[:safe]  # what the caller has, should it stop reading now
                    yield text[emitted:safe]
                    emitted = safe
            text = gen.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = self._find_stop(text, 0)
            if cut is not None:
                text, self.finish_reason = text[:cut], "stop"
            if len(text) > emitted:
                yield text[emitted:]
            self.text = text
        finally:
            self._cancel.set()  # a caller that left early frees the model at the next token
            worker.join()
        if self.error is not None:
            raise self.error

    def _find_stop(self, text: str, emitted: int) -> int | None:
        if not self._stop:
            return None
        start = max(0, emitted - max(len(s) for s in self._stop))
        hits = [text.find(s, start) for s in self._stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _run(self, streamer: _IdStreamer) -> None:
        gen = self._generator
        try:
            with gen.lock:
                if self._cancel.is_set():
                    return
                deadline = None if self._time_limit is None else time.monotonic() + self._time_limit
                cancel = _Cancel(self._cancel, deadline)
                try:
                    gen.generate_ids([self._ids], self._sampling, streamer=streamer, cancel=cancel, images=self._images)
                finally:
                    self.timed_out = cancel.expired
        except BaseException as exc:  # surfaced to the consumer after the stream ends
            self.error = exc
        finally:
            streamer.end()


class Generator:
    """A loaded model, its tokenizer and prompt builder, and the lock that serialises generation."""

    def __init__(self, model: Any, tokenizer: Any, prompts: Any, sampling: Sampling | None = None,
                 truncate_prompt: bool = False, name: str = "lmforge", processor: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor  # an image-text model's: prompts with images go through it
        self.prompts = prompts
        self.sampling = (sampling or Sampling()).check()
        self.truncate_prompt = truncate_prompt
        self.name = name
        self.stop_token_ids: list[int] = list(getattr(prompts, "stop_token_ids", None) or [tokenizer.eos_token_id])
        self.window = context_window(model)
        self.lock = threading.Lock()

    # -- prompts → ids ------------------------------------------------------------------------------

    def encode(self, prompt: str, sampling: Sampling, where: str = "prompt") -> tuple[list[int], Sampling]:
        """Token ids of ``prompt`` and the sampling settings that fit the context window."""
        from lmforge.data.formats import EncodedPrompt

        if isinstance(prompt, EncodedPrompt):  # mistral-common encoded it: its control tokens exist only as ids
            ids = list(prompt.ids)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        window = self.window
        if window is None:
            return ids, sampling
        if len(ids) >= window or (self.truncate_prompt and len(ids) + sampling.max_new_tokens > window):
            if not self.truncate_prompt:
                raise PromptTooLong(
                    f"the prompt is {len(ids)} tokens, the model's context window is {window}",
                    where=where, fix="shorten the prompt, or set truncate_prompt: true to keep only its last tokens",
                )
            keep = max(window - sampling.max_new_tokens, window // 2)
            bos = self.tokenizer.bos_token_id
            head = [bos] if bos is not None and ids[:1] == [bos] else []
            ids = head + ids[len(ids) - (keep - len(head)):]
        room = window - len(ids)
        if sampling.max_new_tokens > room:
            sampling = replace(sampling, max_new_tokens=room)  # the answer ends at the window ("length")
        return ids, sampling

    # -- generation ---------------------------------------------------------------------------------

    def image_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for a conversation whose messages hold content parts (``{"type": "image"}`` where each image
        goes), rendered by the processor's own chat template, as training rendered it."""
        if self.processor is None:
            raise LmforgeError("this model reads text only: it cannot take an image", where="image",
                               fix="load an image-text model (trained with processor_type), or leave the image out")
        from lmforge.data.formats.mistral import ImageConversation, is_mistral_common

        if is_mistral_common(self.processor):  # mistral-common encodes the images with the ids (encode_images)
            return ImageConversation.of(messages)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_images(self, prompt: str, images: list[Any], sampling: Sampling, where: str = "prompt") -> tuple[list[int], dict[str, Any], Sampling]:
        """Token ids (image placeholders expanded) and pixel tensors of an image prompt, and the fitted sampling."""
        from lmforge.data.formats.mistral import ImageConversation, encode_image_conversation
        from lmforge.data.images import TEXT_FIELDS

        if isinstance(prompt, ImageConversation):  # tokenizer_use_mistral_common: its own image encoder, as in training
            ids, inputs = encode_image_conversation(self.processor, prompt, images, where)
        else:
            inputs = self.processor(text=[prompt], images=images, add_special_tokens=False, return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
        dtype = next(self.model.parameters()).dtype
        pixels = {k: (v.to(self.model.device, dtype) if v.is_floating_point() else v.to(self.model.device))
                  for k, v in inputs.items() if k not in TEXT_FIELDS and isinstance(v, torch.Tensor)}
        room = None if self.window is None else self.window - len(ids)
        if room is not None and room <= 0:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens with its images, the model's context window is {self.window}",
                                where=where, fix="shorten the prompt or use fewer images")
        if room is not None and sampling.max_new_tokens > room:
            sampling = replace(sampling, max_new_tokens=room)
        return ids, pixels, sampling

    def generate_ids(self, rows: list[list[int]], sampling: Sampling, streamer: Any = None,
                     cancel: threading.Event | _Cancel | None = None, images: dict[str, Any] | None = None,
                     synced_gpus: bool = False, logits_processor: Any = None,
                     prefill: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> torch.Tensor:
        """``model.generate`` on left-padded rows; returns only the new tokens. Call with ``lock`` held.

        `synced_gpus`: every rank of a sharded model (FSDP2) generates at once, each forward a collective, so a rank
        whose rows are done keeps stepping until all ranks' are (transformers' own switch).
        `prefill(input_ids, attention_mask)`: a KV cache of the rows' first tokens, or None (GRPO's rows that repeat a
        prompt: lmforge.train.rollouts.shared_prefill); generate then runs only the tokens after it."""
        from transformers import StoppingCriteriaList

        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.stop_token_ids[0]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        device = self.model.device
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs = sampling.generate_kwargs()
        if synced_gpus:
            kwargs["synced_gpus"] = True
        if logits_processor is not None:  # GRPO's per-row seeded sampling (lmforge.train.rollouts.RowSampler)
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([cancel if isinstance(cancel, _Cancel) else _Cancel(cancel)])
        # (a sharded model's gathered weights must not become inference tensors: the next training forward reuses them)
        with torch.no_grad() if synced_gpus else torch.inference_mode():
            input_ids, mask = input_ids.to(device), mask.to(device)
            cache = prefill(input_ids, mask) if prefill is not None else None
            if cache is not None:
                kwargs["cache"] = cache
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, streamer=streamer,
                pad_token_id=pad, eos_token_id=self.stop_token_ids, **(images or {}), **kwargs,
            )
        return out[:, width:].cpu()

    def stream(self, prompt: str, sampling: Sampling | None = None, stop: list[str] | None = None,
               where: str = "prompt", time_limit: float | None = None, images: list[Any] | None = None) -> GenerationStream:
        """Start streaming the answer to ``prompt`` (already formatted; with `images`, Pillow images for its image
        placeholders, from :meth:`image_prompt`); raises PromptTooLong before starting."""
        if images:
            if self.processor is None:
                self.image_prompt([])  # the one refusal for a text model
            ids, pixels, fitted = self.encode_images(prompt, images, (sampling or self.sampling).check(), where)
            return GenerationStream(self, ids, fitted, stop or [], time_limit, images=pixels)
        ids, fitted = self.encode(prompt, (sampling or self.sampling).check(), where)
        return GenerationStream(self, ids, fitted, stop or [], time_limit)

    def complete(self, prompt: str, sampling: Sampling | None = None, stop: list[str] | None = None,
                 where: str = "prompt") -> Completion:
        stream = self.stream(prompt, sampling, stop, where)
        for _ in stream:
            pass
        return Completion(stream.text, stream.finish_reason, stream.prompt_tokens, stream.completion_tokens)

    def complete_batch(self, prompts: list[str], sampling: Sampling | None = None,
                       where: list[str] | None = None) -> list[Completion]:
        """Answers to several formatted prompts in one left-padded batch (equal to answering each alone)."""
        sampling = (sampling or self.sampling).check()
        encoded = [self.encode(p, sampling, (where or [])[i] if where else f"prompt {i + 1}") for i, p in enumerate(prompts)]
        rows = [ids for ids, _ in encoded]
        fitted = replace(sampling, max_new_tokens=min(s.max_new_tokens for _, s in encoded))
        with self.lock:
            new = self.generate_ids(rows, fitted)
        stop_ids = set(self.stop_token_ids)
        results = []
        for ids, row in zip(rows, new.tolist()):
            end = next((i for i, t in enumerate(row) if t in stop_ids), None)
            kept = row if end is None else row[:end]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            results.append(Completion(text, "stop" if end is not None else "length", len(ids), len(kept) + (end is not None)))
        return results
