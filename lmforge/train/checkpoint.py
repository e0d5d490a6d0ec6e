"""Write outputs atomically: a crash mid-write never leaves a half-written folder under the final name."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary sibling folder, then rename it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def publish_into(target: Path, write: Callable[[Path], None]) -> None:
    """Write files into a temporary folder, then move each into `target` with an atomic rename."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".publish-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for item in tmp.iterdir():
        os.replace(item, target / item.name)
    tmp.rmdir()


def save_model_files(model: Any, tokenizer: Any, config: dict[str, Any], folder: Path) -> None:
    """Weights (adapter or full model, safetensors), tokenizer and the resolved config."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)
