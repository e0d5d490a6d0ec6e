"""Safe defaults (issue 15.6), each asserted: no pickle, no remote code unless asked (and then a warning),
YAML safe loading, URL configs only over http(s) with a size limit and a timeout, hooks only from the
config's folder or installed packages, servers on 127.0.0.1, no secrets in what lmforge writes or prints."""

from __future__ import annotations

import argparse
import http.server
import inspect
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ARITHMETIC, REPO, tiny_config, write_config, write_jsonl
from fuzz_helpers import run_cli
from lmforge.config import load_config
from lmforge.errors import LmforgeError

PACKAGE = REPO / "lmforge"


def _sources() -> Iterator[tuple[Path, int, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield path, number, code


def test_no_pickle_loading_anywhere_in_the_package() -> None:
    unsafe = []
    for path, number, code in _sources():
        if "torch.load(" in code and "weights_only=True" not in code:
            unsafe.append(f"{path}:{number}: torch.load without weights_only=True")
        if re.search(r"\b(import pickle|from pickle|pickle\.loads?\(|cPickle|dill\.|joblib\.load)", code):
            unsafe.append(f"{path}:{number}: pickle")
        if "allow_pickle=True" in code:
            unsafe.append(f"{path}:{number}: numpy allow_pickle=True")
        if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code) or "yaml.Loader" in code or "UnsafeLoader" in code:
            unsafe.append(f"{path}:{number}: YAML loading that constructs Python objects")
        if re.search(r"trust_remote_code\s*=\s*True", code):
            unsafe.append(f"{path}:{number}: trust_remote_code=True hard-coded")
        if re.search(r"use_safetensors\s*=\s*False|safe_serialization\s*=\s*False", code):
            unsafe.append(f"{path}:{number}: pickle weights")
    assert not unsafe, "\n".join(unsafe)


def test_model_weights_are_read_as_safetensors_only() -> None:
    from lmforge.models.load import load_model

    assert "use_safetensors=True" in inspect.getsource(load_model)


@pytest.fixture()
def config_dir(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC[:4])
    return tmp_path, tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=1)


def test_trust_remote_code_is_off_unless_set_and_warned_when_set(config_dir: tuple[Path, dict]) -> None:
    folder, config = config_dir
    plain = load_config(str(write_config(folder / "a.yml", config)))
    assert plain.model.trust_remote_code is False
    assert not [w for w in plain.warnings if "trust_remote_code" in w]
    trusted = load_config(str(write_config(folder / "b.yml", {**config, "trust_remote_code": True})))
    assert trusted.model.trust_remote_code is True
    [warning] = [w for w in trusted.warnings if "trust_remote_code" in w]
    assert "b.yml:" in warning and "trust" in warning


def test_yaml_tags_that_build_python_objects_are_refused(config_dir: tuple[Path, dict]) -> None:
    folder, config = config_dir
    marker = folder / "ran"
    text = yaml.safe_dump(config) + f"evil: !!python/object/apply:os.system ['touch {marker}']\n"
    (folder / "c.yml").write_text(text)
    with pytest.raises(LmforgeError) as err:
        load_config(str(folder / "c.yml"))
    assert "c.yml" in str(err.value) and "invalid YAML" in str(err.value)
    assert not marker.exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        time.sleep(type(self).delay)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except OSError:  # the client gave up (size limit, timeout)
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_configs_are_read_over_http(server: tuple[str, type[_Handler]], config_dir: tuple[Path, dict]) -> None:
    url, handler = server
    handler.body = yaml.safe_dump(config_dir[1]).encode()
    assert load_config(f"{url}/c.yml").training.max_steps == 1


def test_url_config_over_the_size_limit_is_refused(server: tuple[str, type[_Handler]], monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import loader

    url, handler = server
    handler.body = b"a: 1\n" * (loader.MAX_CONFIG_BYTES // 5 + 10)
    with pytest.raises(LmforgeError) as err:
        load_config(f"{url}/big.yml")
    assert "too big" in str(err.value) and url in str(err.value)


def test_url_config_that_does_not_answer_times_out(server: tuple[str, type[_Handler]], monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import loader

    assert 0 < loader.URL_TIMEOUT_S <= 60
    monkeypatch.setattr(loader, "URL_TIMEOUT_S", 0.5)
    url, handler = server
    handler.delay, handler.body = 3.0, b"a: 1\n"
    started = time.monotonic()
    with pytest.raises(LmforgeError) as err:
        load_config(f"{url}/slow.yml")
    assert time.monotonic() - started < 2.5
    assert "could not fetch config" in str(err.value)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.invalid/c.yml", "s3://bucket/c.yml"])
def test_config_urls_other_than_http_are_refused(location: str) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(location)
    assert "http(s)" in str(err.value)


def _hook_config(config: dict, folder: Path, kind: str) -> Path:
    config = {**config, "datasets": [{"path": config["datasets"][0]["path"], "type": kind}]}
    return write_config(folder / "c.yml", config)


def test_hook_in_the_config_folder_runs(config_dir: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, config = config_dir
    (folder / "myhooks.py").write_text("def fmt(row):\n    return [(row['instruction'], False), (row['output'], True)]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the module is found beside the config, not on the current folder
    cfg = load_config(str(_hook_config(config, folder, "myhooks.fmt")))
    assert cfg.data.datasets[0].type == f"{(folder / 'myhooks.py').resolve()}:fmt"


def test_hook_outside_the_config_folder_is_refused(config_dir: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder, config = config_dir
    other = tmp_path_factory.mktemp("other")
    (other / "stray.py").write_text("def fmt(row):\n    raise SystemExit('ran')\n")
    monkeypatch.chdir(other)  # a module in the current folder (not the config's) is not code the config may name
    with pytest.raises(LmforgeError) as err:
        load_config(str(_hook_config(config, folder, "stray.fmt")))
    assert "c.yml:" in str(err.value) and "config's folder" in str(err.value)
    with pytest.raises(LmforgeError) as err:
        load_config(str(_hook_config(config, folder, f"{other / 'stray.py'}:fmt")))
    assert "outside the config's folder" in str(err.value)


def test_hook_from_a_url_config_must_be_installed(server: tuple[str, type[_Handler]], config_dir: tuple[Path, dict]) -> None:
    url, handler = server
    folder, config = config_dir
    (folder / "local.py").write_text("def fmt(row):\n    return []\n")
    handler.body = yaml.safe_dump({**config, "datasets": [{"path": config["datasets"][0]["path"], "type": f"{folder / 'local.py'}:fmt"}]}).encode()
    with pytest.raises(LmforgeError) as err:
        load_config(f"{url}/c.yml")
    assert "URL" in str(err.value)


def test_the_hook_rule_is_in_the_docs() -> None:
    text = (REPO / "README.md").read_text() + "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    assert re.search(r"config's folder.{0,200}installed|installed.{0,200}config's folder", text, re.S), \
        "the docs must say where hook functions may come from"


def _defaults(parser: argparse.ArgumentParser, command: str) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return {a.dest: a.default for a in sub.choices[command]._actions}  # noqa: SLF001


def test_servers_listen_on_this_machine_only_by_default() -> None:
    from lmforge.cli import build_parser
    from lmforge.config.sections import InferenceSection
    from lmforge.recipes import inference

    parser = build_parser()
    assert _defaults(parser, "serve")["host"] == "127.0.0.1"
    assert _defaults(parser, "inference")["host"] is None  # then gradio_server_name, then 127.0.0.1:
    assert InferenceSection().gradio_server_name is None and InferenceSection().gradio_share is False
    source = inspect.getsource(inference)
    assert 'or inf.gradio_server_name or "127.0.0.1"' in source
    assert "0.0.0.0" not in source


SECRET = "s3cr3t-pw-123"


def test_secrets_stay_out_of_saved_configs_and_validate_output(config_dir: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes.run import TrainingRun
    from lmforge.redact import redact

    folder, config = config_dir
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = write_config(folder / "c.yml", {**config, "mlflow_tracking_uri": f"https://user:{SECRET}@mlflow.example/?token={SECRET}"})
    result = run_cli(["validate", str(path), "--print-config"])
    assert result.code == 0, result.err
    assert SECRET not in result.out + result.err
    assert "https://user:***@mlflow.example" in result.out
    cfg = load_config(str(path))
    run = TrainingRun(cfg, "train")  # what it saves beside checkpoints and outputs and sends to trackers
    assert SECRET not in yaml.safe_dump(run.resolved)
    assert cfg.logging.mlflow_tracking_uri.endswith(SECRET)  # the tracker itself still gets the real URI
    assert redact({"comet_api_key": SECRET, "hub_token": SECRET, "eos_token": "</s>"}) == \
        {"comet_api_key": "***", "hub_token": "***", "eos_token": "</s>"}


def test_a_training_run_writes_no_secret(config_dir: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, config = config_dir
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = write_config(folder / "c.yml", {**config, "save_steps": 1})
    result = run_cli(["train", str(path)])
    assert result.code == 0, result.err
    assert SECRET not in result.out + result.err
    leaks = [p for p in (folder / "out").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
