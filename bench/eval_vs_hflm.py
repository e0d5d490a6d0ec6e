"""`lmforge eval`'s batched generation vs lm-eval's own HFLM, on the same loaded model and the same GSM8K questions.

Both get the model object lmforge loaded (SmolLM2-135M-Instruct from the GGUF, in the dtype `lmforge eval` picks),
the same prompts (the training format of examples/smollm2-135m/lora-gsm8k.yml), greedy decoding, the same
answer length and batch size, and stop at the same end-of-turn token. lmforge generates through
lmforge.eval.heldout.generate_answers (what `lmforge eval` runs); lm-eval through ``HFLM.generate_until``.
The machine is shared, so the two run interleaved (lmforge, lm-eval, then lm-eval, lmforge, ...) and the table
gives each one's best and median round. Generated tokens are counted the same way for both: the answer text
re-tokenized. Also prints how many answers are identical.

Usage: python bench/eval_vs_hflm.py [--questions 50] [--max_new_tokens 256] [--batch_size 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples/smollm2-135m/lora-gsm8k.yml"))
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))

    import logging

    from lmforge.train.threads import settle_threads

    # As `lmforge eval` does (cli._settle_threads), before torch loads: on busy cores the team waits passively, since
    # spinning OpenMP threads on a shared machine cost both generators many times their compute.
    notice = settle_threads(None).notice
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    import torch
    from common import machine_description
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.config import load_config
    from lmforge.eval.heldout import generate_answers
    from lmforge.infer.generate import Sampling
    from lmforge.recipes.inference import SamplingFlags, build_generator

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    cfg = load_config(args.config, [], check_paths=False)
    gen = build_generator(cfg, None, flags=SamplingFlags(max_new_tokens=args.max_new_tokens))
    tokenizer = gen.tokenizer
    with open(REPO / "data/gsm8k/test.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(args.questions), f)]
    prompts = [gen.prompts.single(q) for q in questions]
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    stop_strings = [tokenizer.decode([i]) for i in gen.stop_token_ids]
    hflm = HFLM(pretrained=gen.model, tokenizer=tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_new_tokens)

    def run_lmforge() -> list[str]:
        completions, _ = generate_answers(gen, prompts, sampling, args.batch_size)
        return [c.text for c in completions]

    def run_hflm() -> list[str]:
        requests = [Instance("generate_until", {}, (p, {"until": stop_strings, "max_gen_toks": args.max_new_tokens, "do_sample": False}), i)
                    for i, p in enumerate(prompts)]
        return hflm.generate_until(requests, disable_tqdm=True)

    def tokens(texts: list[str]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)

    gen.complete_batch(prompts[:2], Sampling(max_new_tokens=4))  # warm-up: first-call allocations out of the timing
    times: dict[str, list[float]] = {"lmforge": [], "lm-eval HFLM": []}
    counts: dict[str, int] = {}
    answers: dict[str, list[str]] = {}
    for round_ in range(args.rounds):
        order = (("lmforge", run_lmforge), ("lm-eval HFLM", run_hflm))
        for name, fn in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first: load drifts
            started = time.perf_counter()
            with torch.inference_mode():
                texts = fn()
            times[name].append(time.perf_counter() - started)
            counts[name], answers[name] = tokens(texts), texts
            print(f"round {round_ + 1}: {name} {counts[name]} tokens in {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    info = machine_description()
    load = os.getloadavg()
    print(f"# `lmforge eval` generation vs lm-eval HFLM: {args.questions} GSM8K test questions, SmolLM2-135M-Instruct "
          f"({str(next(gen.model.parameters()).dtype).removeprefix('torch.')}, {gen.model.device.type}), greedy, "
          f"up to {args.max_new_tokens} new tokens, batches of {args.batch_size}, {args.rounds} interleaved rounds")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {info.get('cpu')}, {info.get('cpus')} CPUs, ISA {info.get('isa')}; "
          f"torch threads {torch.get_num_threads()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine)")
    print("| generator | new tokens | best s | median s | tokens/s (best) | tokens/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        print(f"| {name} | {counts[name]} | {best:.1f} | {median:.1f} | {counts[name] / best:.1f} | {counts[name] / median:.1f} |")
    ratio_best = (counts["lmforge"] / min(times["lmforge"])) / (counts["lm-eval HFLM"] / min(times["lm-eval HFLM"]))
    ratio_median = (counts["lmforge"] / statistics.median(times["lmforge"])) / (counts["lm-eval HFLM"] / statistics.median(times["lm-eval HFLM"]))
    same = sum(a.strip() == b.strip() for a, b in zip(answers["lmforge"], answers["lm-eval HFLM"]))
    print(f"lmforge / lm-eval tokens/s: {ratio_best:.2f}x (best rounds), {ratio_median:.2f}x (medians); "
          f"identical answers: {same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
