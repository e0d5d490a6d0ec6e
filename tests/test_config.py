"""Config loading: axolotl keys accepted, every mistake named with its line and a fix."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from lmforge.config import json_schema, load_config
from lmforge.errors import LmforgeError

BASE = """\
base_model: ./model
datasets:
  - path: data.jsonl
    type: alpaca
sequence_len: 128
"""


def write(tmp_path: Path, text: str) -> str:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_axolotl_flat_keys_land_in_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + "lora_r: 16\nadapter: lora\nlearning_rate: 0.0003\nwandb_project: p\n"))
    assert cfg.adapter.lora_r == 16
    assert cfg.adapter.adapter == "lora"
    assert cfg.training.learning_rate == 0.0003
    assert cfg.data.sequence_len == 128
    assert cfg.logging.wandb_project == "p"


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(write(tmp_path, BASE + "lora_rr: 8\n"))
    text = str(err.value)
    assert "config.yml:6" in text and "lora_rr" in text and "did you mean lora_r?" in text


def test_unknown_key_inside_dataset_entry(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(write(tmp_path, BASE.replace("sequence_len", "  - path: data.jsonl\n    typ: alpaca\nsequence_len")))
    assert "config.yml:6" in str(err.value) and "did you mean type?" in str(err.value)


def test_wrong_type_names_key_value_and_line(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(write(tmp_path, BASE + "micro_batch_size: many\n"))
    text = str(err.value)
    assert "config.yml:6" in text and "micro_batch_size" in text and "'many'" in text and "integer" in text


def test_wrong_choice_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(write(tmp_path, BASE + "lr_scheduler: cosin\n"))
    assert "'cosine'" in str(err.value) and "'cosin'" in str(err.value)


@pytest.mark.parametrize("value", [0, -5])
def test_sequence_len_must_be_positive(tmp_path: Path, value: int) -> None:
    with pytest.raises(LmforgeError, match="sequence_len.*greater than 0"):
        load_config(write(tmp_path, BASE.replace("sequence_len: 128", f"sequence_len: {value}")))


def test_unsupported_axolotl_key_refused_by_name_unless_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec  # deepspeed is refused on CPU only where it is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(LmforgeError, match="'deepspeed' is not supported yet"):
        load_config(write(tmp_path, BASE + "deepspeed: ds.json\n"))
    cfg = load_config(write(tmp_path, BASE + "xformers_attention: false\nstrict: false\n"))
    assert cfg.notices == []  # switched off: asks for nothing
    cfg = load_config(write(tmp_path, BASE + "strict: true\n"))
    assert [(n.key, n.text) for n in cfg.notices] == [("strict", "lmforge always validates strictly")]


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["--lora_r=32", "--bf16=false", "--learning_rate=1e-3"])
    assert cfg.adapter.lora_r == 32 and cfg.training.bf16 is False and cfg.training.learning_rate == 1e-3
    with pytest.raises(LmforgeError, match="--lora_r on the command line"):
        load_config(write(tmp_path, BASE), ["--lora_r=x"])


def test_missing_dataset_file_named(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(write(tmp_path, BASE.replace("path: data.jsonl", "path: nope.jsonl")))
    assert "config.yml:3" in str(err.value) and "nope.jsonl" in str(err.value)


def test_missing_model_path_named(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="model path does not exist: ./nomodel"):
        load_config(write(tmp_path, BASE.replace("./model", "./nomodel")))


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="invalid YAML"):
        load_config(write(tmp_path, BASE + "x: !!python/object/apply:os.system ['echo hi']\n"))


def test_config_from_url(tmp_path: Path) -> None:
    write(tmp_path, BASE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = load_config(f"http://127.0.0.1:{server.server_port}/config.yml")
        assert cfg.data.sequence_len == 128
    finally:
        server.shutdown()


def test_json_schema_lists_keys_and_forbids_others() -> None:
    schema = json_schema()
    assert {"base_model", "lora_r", "datasets", "sequence_len"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    json.dumps(schema)
