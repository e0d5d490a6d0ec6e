"""Image-text models after training: `inference --image`, the chat's /image, `serve` with OpenAI image_url parts
(driven by the `openai` client), merge-lora, and the GGUF export refused in one line. Answers are compared with
greedy generation through transformers alone."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import DIGITS_VL, write_config, write_jsonl
from infer_helpers import free_port, wait_for_port
from lmforge.cli import main

QUESTION = "Which digit is this?"


def digit_png(folder: Path, index: int = 0) -> tuple[Path, str]:
    row = json.loads((DIGITS_VL / "test.jsonl").read_text().splitlines()[index])
    path = folder / f"digit{index}.png"
    path.write_bytes(base64.b64decode(row["messages"][0]["content"][0]["base64"]))
    return path, row["messages"][0]["content"][0]["base64"]


def vl_config(folder: Path, model_dir: Path, **extra: object) -> Path:
    config = {"base_model": str(model_dir), "processor_type": "AutoProcessor",
              "datasets": [{"path": str(DIGITS_VL / "test.jsonl"), "type": "chat_template"}],
              "sequence_len": 64, "micro_batch_size": 8, "max_steps": 3, "learning_rate": 1e-3, "bf16": False,
              "output_dir": str(folder / "out"), "save_strategy": "no", "max_new_tokens": 4}
    config.update(extra)
    return write_config(folder / "config.yml", config)


def reference_answer(model_dir: Path, image: Path, text: str = QUESTION, tokens: int = 4) -> str:
    """Greedy generation through transformers' own processor and generate."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(image).convert("RGB")], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                             eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_inference_with_an_image_answers_as_transformers_does(tmp_path: Path, tiny_vlm_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    image, _ = digit_png(tmp_path)
    config = vl_config(tmp_path, tiny_vlm_dir)
    main(["inference", str(config), "--image", str(image), "--prompt", QUESTION, "--max_new_tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out.strip() == reference_answer(tiny_vlm_dir, image).strip()


def test_inference_image_mistakes_get_one_line(tmp_path: Path, tiny_vlm_dir: Path, tiny_model_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = vl_config(tmp_path, tiny_vlm_dir)
    assert main(["inference", str(config), "--image", str(tmp_path / "none.png"), "--prompt", QUESTION]) != 0
    assert "image file" in capsys.readouterr().err
    text = write_config(tmp_path / "text.yml", {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
                                                 "datasets": [{"path": str(DIGITS_VL / "test.jsonl"), "type": "chat_template"}]})
    image, _ = digit_png(tmp_path)
    assert main(["inference", str(text), "--image", str(image), "--prompt", QUESTION]) != 0
    assert "--image needs an image-text model" in capsys.readouterr().err


def test_chat_image_command_attaches_the_image_to_the_next_message(tmp_path: Path, tiny_vlm_dir: Path) -> None:
    import io

    from lmforge.config import load_config
    from lmforge.infer.chat import ChatSession
    from lmforge.recipes.inference import SamplingFlags, build_generator

    image, _ = digit_png(tmp_path)
    gen = build_generator(load_config(str(vl_config(tmp_path, tiny_vlm_dir)), [], check_paths=False),
                          flags=SamplingFlags(max_new_tokens=4, temperature=0))
    out = io.StringIO()
    session = ChatSession(gen, out=out, save_path=str(tmp_path / "chat.jsonl"))
    assert session.command(f"/image {image}")
    session.messages.append({"role": "user", "content": QUESTION})
    session.answer()
    assert session.messages[-1]["content"].strip() == reference_answer(tiny_vlm_dir, image).strip()
    assert "attached" in out.getvalue()
    assert session.command("/image /nowhere.png") and "image file" in out.getvalue()


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def vl_server(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve-vl")
    config = vl_config(tmp, tiny_vlm_dir)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(config), "--port", str(port),
                             "--max_new_tokens", "4", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def test_served_model_answers_an_openai_image_url_request(vl_server: str, tmp_path: Path, tiny_vlm_dir: Path) -> None:
    image, encoded = digit_png(tmp_path)
    client = openai.OpenAI(base_url=vl_server, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}, {"type": "text", "text": QUESTION}]}])
    assert reply.choices[0].message.content.strip() == reference_answer(tiny_vlm_dir, image).strip()
    with pytest.raises(openai.BadRequestError, match="data: URLs only"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/digit.png"}}, {"type": "text", "text": QUESTION}]}])


def test_merge_lora_of_an_image_text_model_keeps_its_answers(tmp_path: Path, tiny_vlm_dir: Path) -> None:
    from lmforge.config import load_config
    from lmforge.recipes.finetune import run_train

    config = vl_config(tmp_path, tiny_vlm_dir, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                       max_steps=5, learning_rate=0.05)
    run_train(load_config(str(config)))
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(config), "--lora_model_dir", str(tmp_path / "out"), "--output_dir", str(merged)]) == 0
    assert (merged / "processor_config.json").exists()
    image, _ = digit_png(tmp_path)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and AutoProcessor.from_pretrained(merged) is not None
    assert reference_answer(merged, image) is not None


def test_gguf_export_of_an_image_text_model_is_refused_in_one_line(tmp_path: Path, tiny_vlm_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = vl_config(tmp_path, tiny_vlm_dir)
    assert main(["export", str(config), "--output", str(tmp_path / "m.gguf")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("mmproj" in line for line in err)


def test_gradio_chat_takes_an_uploaded_image_in_headless_chromium(tmp_path: Path, tiny_vlm_dir: Path) -> None:
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from test_web_ui import _bot_text, _browser, _wait

    from lmforge.config import load_config
    from lmforge.infer.web import launch
    from lmforge.recipes.inference import SamplingFlags, build_generator

    image, _ = digit_png(tmp_path)
    expected = reference_answer(tiny_vlm_dir, image).strip()
    driver = _browser(tmp_path)
    app = None
    try:
        gen = build_generator(load_config(str(vl_config(tmp_path, tiny_vlm_dir)), [], check_paths=False),
                              flags=SamplingFlags(max_new_tokens=4, temperature=0))
        port = free_port()
        app = launch(gen, port=port, block=False)
        driver.get(f"http://127.0.0.1:{port}/")
        upload = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, '#image input[type="file"]'), 30, "the image upload")[0]
        upload.send_keys(str(image))
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#image img"), 30, "the uploaded image's preview")
        box = driver.find_elements(By.CSS_SELECTOR, "#message textarea")[0]
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        _wait(lambda: _bot_text(driver) == expected, 60, f"the answer {expected!r} (page shows {_bot_text(driver)!r})")
        assert driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"] img')  # the image is in the chat
        shot = tmp_path / "gradio-image-chat.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LMFORGE_TEST_ARTIFACTS"):
            import shutil

            shutil.copy(shot, Path(os.environ["LMFORGE_TEST_ARTIFACTS"]) / shot.name)
    finally:
        driver.quit()
        if app is not None:
            app.close()
