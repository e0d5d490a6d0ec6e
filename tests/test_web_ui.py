"""`inference --gradio` end to end in headless Chromium: type a question, watch the answer stream in, stop, clear.

Needs Debian's chromium and chromium-driver (scripts/setup.sh test installs them as root). Without
them the test skips on a developer's machine and fails in CI, where they must be present.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from infer_helpers import free_port, tiny_infer_config

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Offline-safe flags: without the background-networking ones Chromium keeps dialling Google's hosts.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1100,900",
)
QUESTION = "what is two plus two ?"


def _browser(tmp_path: Path) -> Any:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "needs chromium and chromium-driver (bash scripts/setup.sh test installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _slow_down(model: Any, seconds: float) -> None:
    """Make each decoding step take a while, so the browser can see an answer half written."""
    forward = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow


def _bot_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    bots = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')
    return bots[-1].text.strip() if bots else ""


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what}")


def test_gradio_chat_in_headless_chromium(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from lmforge.config import load_config
    from lmforge.infer.web import launch
    from lmforge.recipes.inference import SamplingFlags, build_generator

    driver = _browser(tmp_path)
    app = None
    try:
        cfg = load_config(str(tiny_infer_config(tmp_path, tiny_model_dir)), [], check_paths=False)
        gen = build_generator(cfg, flags=SamplingFlags(max_new_tokens=24))
        expected = gen.complete(gen.prompts.single(QUESTION)).text  # greedy: what the page must show
        assert len(expected.split()) > 3
        _slow_down(gen.model, 0.08)
        port = free_port()
        app = launch(gen, port=port, block=False)
        driver.get(f"http://127.0.0.1:{port}/")
        box = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#message textarea"), 30, "the message box")[0]
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        seen: list[str] = []

        def finished() -> bool:
            text = _bot_text(driver)
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            return text == expected

        _wait(finished, 60, f"the answer {expected!r} (saw {seen[-3:]})")
        assert any(0 < len(s) < len(expected) and expected.startswith(s) for s in seen), f"no partial answer seen: {seen}"
        user = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]')
        assert user and user[-1].text.strip() == QUESTION
        shot = tmp_path / "gradio-chat.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LMFORGE_TEST_ARTIFACTS"):
            shutil.copy(shot, Path(os.environ["LMFORGE_TEST_ARTIFACTS"]) / shot.name)

        # Stop: ask again, stop once the answer has begun; it must stop growing short of the full answer.
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')) == 2 and 0 < len(_bot_text(driver)) < len(expected),
              30, "the second answer to start")
        driver.find_element(By.ID, "stop").click()
        time.sleep(0.5)
        stopped = _bot_text(driver)
        time.sleep(0.8)  # ten more tokens' time
        assert _bot_text(driver) == stopped and len(stopped) < len(expected) and expected.startswith(stopped)

        # Clear empties the conversation.
        driver.find_element(By.ID, "clear").click()
        _wait(lambda: not driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]'), 10, "the chat to clear")
    finally:
        driver.quit()
        if app is not None:
            app.close()
