"""Generation throughput: one prompt at a time (streamed, as --prompt/--chat/serve do) vs left-padded batches (--jsonl).

Prints a table (tokens/s) and how many greedy answers the batch reproduces exactly.
Usage: python bench/generate_batch.py [--config CONFIG] [--lora_model_dir DIR] [--prompts 8] [--max_new_tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "examples/smollm2-135m/lora-gsm8k.yml"))
    parser.add_argument("--lora_model_dir", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from lmforge.config import load_config
    from lmforge.recipes.inference import SamplingFlags, build_generator

    gen = build_generator(load_config(args.config, [], check_paths=False), args.lora_model_dir,
                          flags=SamplingFlags(max_new_tokens=args.max_new_tokens))
    with open(REPO / "data/gsm8k/test.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(args.prompts), f)]
    prompts = [gen.prompts.single(q) for q in questions]
    gen.complete(prompts[0])  # warm-up

    start = time.perf_counter()
    alone = [gen.complete(p) for p in prompts]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = []
    for i in range(0, len(prompts), args.batch_size):
        batched += gen.complete_batch(prompts[i:i + args.batch_size])
    batch_s = time.perf_counter() - start

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = gen.model.device
    print(f"# {gen.name} on {device}, {len(prompts)} GSM8K prompts, up to {args.max_new_tokens} new tokens, load average {load:.1f}")
    print("| mode | new tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, results, seconds in (("one at a time (streamed)", alone, alone_s), (f"batches of {args.batch_size} (left-padded)", batched, batch_s)):
        tokens = sum(r.completion_tokens for r in results)
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |")
    same = sum(a.text == b.text for a, b in zip(alone, batched))
    print(f"identical greedy answers: {same}/{len(prompts)}")
    sys.exit(0)


if __name__ == "__main__":
    main()
