#!/usr/bin/env python
"""How cost grows: tokens/s and peak memory of LoRA training over sequence length and micro-batch, lmforge vs TRL.

    nice -n 10 .venv/bin/python bench/cost_growth.py                                  # full grid, 24 GB limit
    nice -n 10 .venv/bin/python bench/cost_growth.py --seqs 256,512 --batches 1,2 --rss-limit-gb 5 --threads 1

Each cell: SmolLM2-135M with LoRA (the bench_vs_peers LoRA settings: r 16 on every linear layer, bf16
autocast, AdamW), micro-batches of full windows of Tiny Shakespeare (every token labelled, no padding: the
worst case for memory), 1 warm-up + ``--steps`` timed steps, the same batch file for both tools (TRL with bf16
weights, its fastest LoRA setting in bench/sft_vs_peers.py). A run whose process tree passes
``--rss-limit-gb`` is killed and the cell reads OOM; once a tool runs out of memory at some (seq, batch),
its larger cells on that row are skipped as OOM too (cost only grows). The table goes to stdout and, unless
``--no-results``, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import sft_vs_peers as peers  # noqa: E402

# TRL with bf16 weights, its fastest LoRA setting where bf16 runs (fp32 weights where it does not: precision below).
TOOLS = {"lmforge": ("lmforge", {}), "trl": ("trl", {"dtype": "bfloat16"})}


def windows_file(path: Path, model_dir: Path, seq: int, batch: int, steps: int, seed: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(Path(REPO / "data/tinyshakespeare/input.txt").read_text())["input_ids"]
    starts = list(range(0, len(ids) - seq, seq))
    random.Random(seed).shuffle(starts)
    windows = [ids[s : s + seq] for s in starts[: steps * batch]]
    spec = {"micro_batch": batch, "seq_len": seq, "source": f"Tiny Shakespeare, {seq}-token windows",
            "batches": [[{"input_ids": w, "labels": w} for w in windows[i : i + batch]]
                        for i in range(0, len(windows), batch)]}
    path.write_text(json.dumps(spec))
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="256,512,1024,2048,4096")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--tools", default="lmforge,trl")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rss-limit-gb", type=float, default=24.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    os.chdir(REPO)
    seqs = [int(x) for x in args.seqs.split(",")]
    sizes = [int(x) for x in args.batches.split(",")]
    tools = args.tools.split(",")
    stamp = dt.datetime.now(dt.timezone.utc)
    root = BENCH / "runs" / ("growth-" + stamp.strftime("%Y%m%d-%H%M%S"))
    root.mkdir(parents=True)
    model_dir = common.model_dir()
    import torch

    from lmforge.device import cpu_supports_bf16

    precision = "bf16" if (torch.cuda.is_available() or cpu_supports_bf16()) else "fp32"
    run_args = argparse.Namespace(warmup=1, threads=args.threads, timeout=args.timeout, lmforge_set=[],
                                  rss_limit_mb=args.rss_limit_gb * 1024, precision=precision, model_dir=None,
                                  peer_attn="sdpa", peer_liger=False, peer_4bit=False)
    cells: dict[tuple[str, int, int], str] = {}
    for tool in tools:
        name, opts = TOOLS[tool]
        for seq in seqs:
            oom = False
            for batch in sizes:
                key = (tool, seq, batch)
                if oom:
                    cells[key] = "OOM (skipped)"
                    continue
                cell = root / f"s{seq}-b{batch}"
                cell.mkdir(exist_ok=True)
                spec_path = cell / "batches.json"
                spec = json.loads(spec_path.read_text()) if spec_path.exists() else \
                    windows_file(spec_path, model_dir, seq, batch, 1 + args.steps, 42)
                ctx = {"dir": cell, "batches": spec_path, "spec": spec, "model_dir": model_dir, "init_dir": None,
                       "seq": seq}
                peers.LABELS.setdefault(tool, tool)
                try:
                    r = peers.run_variant(tool, name, opts, "lora", ctx, run_args)
                    cells[key] = f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb'] / 1024:.1f} GB (load {r['load']:.1f})"
                except common.BenchError as exc:
                    text = str(exc)
                    oom = text.startswith("out of memory") or "Killed" in text or "MemoryError" in text
                    cells[key] = "OOM" if oom else f"failed: {' '.join(text.split())[:80]}"
                print(f"[growth {time.strftime('%H:%M:%S')}] {tool} seq {seq} batch {batch}: {cells[key]}",
                      file=sys.stderr, flush=True)
    lines = ["| seq \\ micro-batch | tool | " + " | ".join(str(b) for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for seq in seqs:
        for tool in tools:
            lines.append(f"| {seq} | {tool} | " + " | ".join(cells.get((tool, seq, b), "") for b in sizes) + " |")
    table = "\n".join(lines)
    report = (f"## {stamp.strftime('%Y-%m-%d %H:%M UTC')}: how cost grows, LoRA SmolLM2-135M (bench/cost_growth.py)\n\n"
              f"`python bench/cost_growth.py {' '.join(sys.argv[1:])}`; precision {precision}; memory limit {args.rss_limit_gb:g} GB "
              f"(a run past it is killed: OOM); {args.steps} timed step(s) after 1 warm-up; real tokens/s and peak RSS.\n\n"
              f"{table}\n")
    print(report)
    (root / "report.md").write_text(report)
    if not args.no_results:
        with open(BENCH / "RESULTS.md", "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
