"""`lmforge inference CONFIG --gradio`: a gradio chat web UI, on 127.0.0.1 unless told otherwise.

The page streams each answer as it is generated, has Send, Stop and Clear buttons and the
sampling settings, and renders the conversation with the training format, like ``--chat``.
No public share link unless ``--share`` (or ``gradio_share: true``); no analytics calls and no web
fonts fetched, so it works offline. Several browser tabs share the one model: answers queue.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.infer.generate import GenerationStream, Generator


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local UI
try:  # imported at module level: gradio finds `gr.Request` parameters through this module's globals
    import gradio as gr
except ImportError:  # pragma: no cover - the serve extra is not installed
    gr = None


def _gradio() -> Any:
    if gr is None:
        raise LmforgeError("the web UI needs gradio", where="--gradio", fix="pip install 'lmforge[serve]' (scripts/setup.sh does)")
    return gr


def _text(content: Any) -> str:
    """A chatbot message's content as plain text (gradio may hand it back as a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def _image_path(content: Any) -> str | None:
    """The file path of an image message (gradio hands a file back as {"path": ...}, {"file": {...}} or a list of parts)."""
    if isinstance(content, dict):
        return content.get("path") or _image_path(content.get("file")) if "text" not in content else None
    if isinstance(content, (list, tuple)):
        return next((p for p in map(_image_path, content) if p), None)
    return getattr(content, "path", None) if content is not None and not isinstance(content, str) else None


def _image_conversation(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """A chat holding uploaded images as the processor's template reads it: each user text turn with the images
    uploaded before it (image parts first, as the image chats trained), and the images in order."""
    from lmforge.data.images import open_image

    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    waiting = 0
    for m in history:
        path = _image_path(m["content"]) if m["role"] == "user" else None
        if path:
            images.append(open_image(path, where="uploaded image"))
            waiting += 1
            continue
        parts = [{"type": "image"}] * waiting if m["role"] == "user" else []
        waiting = 0 if m["role"] == "user" else waiting
        messages.append({"role": m["role"], "content": parts + [{"type": "text", "text": _text(m["content"])}]})
    if waiting:  # images sent with no text after them: asked about as they are
        messages.append({"role": "user", "content": [{"type": "image"}] * waiting})
    return messages, images


def build_app(gen: Generator, title: str | None = None, max_new_tokens: int | None = None,
              temperature: float | None = None) -> Any:
    """The gradio Blocks app for ``gen`` (not launched)."""
    _gradio()
    title = title or f"lmforge: {gen.name}"
    defaults = gen.sampling.with_overrides(max_new_tokens=max_new_tokens, temperature=temperature)
    limit = max(defaults.max_new_tokens, min(gen.window or 4096, 4096))
    active: dict[str, GenerationStream] = {}  # the answer each browser session is streaming

    def add_message(text: str, image: str | None, history: list[dict[str, Any]]) -> tuple[str, None, list[dict[str, Any]]]:
        added = [{"role": "user", "content": {"path": image}}] if image else []
        if text.strip():
            added.append({"role": "user", "content": text})
        return ("", None, history + added) if added else (text, None, history)

    def respond(history: list[dict[str, Any]], system: str | None, max_new: float, temp: float, top_p: float, top_k: float,
                repetition: float, seed: float | None, request: gr.Request) -> Any:
        if not history or history[-1]["role"] != "user":
            yield history
            return
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        system = (system or "").strip()
        if system and gen.prompts.multi_turn:
            messages = [{"role": "system", "content": system}] + messages
        sampling = replace(
            defaults, max_new_tokens=int(max_new), temperature=float(temp), top_p=float(top_p), top_k=int(top_k),
            repetition_penalty=float(repetition), seed=None if seed is None or seed < 0 else int(seed),
        )
        try:
            if getattr(gen, "processor", None) is not None and any(_image_path(m["content"]) for m in history if m["role"] == "user"):
                parts, images = _image_conversation(history)
                if system:
                    parts = [{"role": "system", "content": [{"type": "text", "text": system}]}] + parts
                stream = gen.stream(gen.image_prompt(parts), sampling, where="this message", images=images)
            else:
                stream = gen.stream(gen.prompts.conversation(messages), sampling, where="this message")
        except LmforgeError as exc:
            raise gr.Error(exc.format()) from exc
        key = request.session_hash or "default"
        active[key] = stream
        history = history + [{"role": "assistant", "content": ""}]
        try:
            for piece in stream:
                history[-1]["content"] += piece
                yield history
        finally:
            stream.cancel()
            if active.get(key) is stream:
                del active[key]
        yield history

    def stop(request: gr.Request) -> None:
        stream = active.get(request.session_hash or "default")
        if stream is not None:
            stream.cancel()

    def clear(request: gr.Request) -> tuple[list, str]:
        stop(request)
        return [], ""

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"### {title}\n{gen.prompts.explain()}.")
        chatbot = gr.Chatbot(elem_id="chat", height=440, label="conversation", feedback_options=None, buttons=["copy", "copy_all"])
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message; Enter sends", show_label=False, elem_id="message", scale=6, autofocus=True)
            send_button = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=70)
            stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=70)
            clear_button = gr.Button("Clear", elem_id="clear", scale=1, min_width=70)
        # an image-text model's chat takes an image with the next message (sent with Send, before the text)
        image = gr.Image(type="filepath", label="image (sent with your next message)", elem_id="image", height=160,
                         visible=getattr(gen, "processor", None) is not None, sources=["upload"])
        with gr.Accordion("Sampling", open=False):
            system = gr.Textbox(label="system message", visible=gen.prompts.multi_turn, elem_id="system")
            with gr.Row():
                max_new = gr.Slider(1, limit, value=defaults.max_new_tokens, step=1, label="max_new_tokens", elem_id="max_new_tokens")
                temp = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="top_p", elem_id="top_p")
            with gr.Row():
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top_k (0: off)", elem_id="top_k")
                repetition = gr.Slider(0.8, 2, value=defaults.repetition_penalty, step=0.05, label="repetition_penalty", elem_id="repetition_penalty")
                seed = gr.Number(value=defaults.seed if defaults.seed is not None else -1, precision=0, label="seed (-1: random)", elem_id="seed")
        settings = [system, max_new, temp, top_p, top_k, repetition, seed]
        answers = []
        for trigger in (box.submit, send_button.click):
            event = trigger(add_message, [box, image, chatbot], [box, image, chatbot], queue=False)
            answers.append(event.then(respond, [chatbot, *settings], chatbot))
        stop_button.click(stop, None, None, cancels=answers, queue=False)
        clear_button.click(clear, None, [chatbot, box], cancels=answers, queue=False)
    return app


def launch(gen: Generator, host: str = "127.0.0.1", port: int = 7860, share: bool = False, title: str | None = None,
           max_new_tokens: int | None = None, temperature: float | None = None, block: bool = True) -> Any:
    """Serve the web UI; blocks until Ctrl-C unless ``block`` is False (then returns the app; ``app.close()`` ends it)."""
    _gradio()
    app = build_app(gen, title, max_new_tokens, temperature)
    # System fonts only: the default theme would fetch Google Fonts from the browser.
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=fonts, font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=4)
    try:
        # prevent_thread_lock: launch returns, and we say where the page is in our words (gradio's own
        # lines name launch() arguments, not our flags) before blocking.
        _, local_url, share_url = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                             quiet=True, theme=theme, ssr_mode=False, mcp_server=False, footer_links=[])
    except OSError as exc:
        raise LmforgeError(f"could not listen on {host}:{port}: {exc}", where="--port", fix="choose another --port") from exc
    if block:
        where = f"{local_url}" + (f" and {share_url} (public)" if share_url else "")
        print(f"[lmforge] web chat on {where}; Ctrl-C stops it", file=sys.stderr, flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return app
