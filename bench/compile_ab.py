#!/usr/bin/env python
"""torch_compile on or off: LoRA training tokens/s of the same model on the same batches, interleaved A/B (issue 28).

Builds a random Llama with SmolLM2-135M's layer shapes (fewer layers, a smaller vocabulary: the head is not what
compile changes), wraps it in LoRA (r 16, every linear), copies it, and compiles the copy's decoder layers with
lmforge's own `compile_layers`. Each batch has a new width (what made the old per-layer compile recompile). First
one pass over the batches on the compiled copy: the compile time and dynamo's graph count. Then `--rounds` rounds,
each running every batch eager then compiled (forward + backward), so the load of a shared machine falls on both
alike; the ratio of the two sums is the number to read. Prints the CPU flags and the load average too.

    nice -n 10 .venv/bin/python bench/compile_ab.py
    nice -n 10 .venv/bin/python bench/compile_ab.py --dtype fp32 --layers 2 --rounds 3 --widths 96,160,224,288
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "(none of avx2/avx512/amx)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--widths", default="128,192,256,320,384", help="one batch per width (tokens), comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.config.sections import SpeedSection
    from lmforge.models.kernels import compile_layers
    from lmforge.train.loss import causal_lm_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    graphs: list[int] = []

    def counting_inductor(graph, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(1)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    torch._dynamo.register_backend(counting_inductor, "counting_inductor")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    eager = get_peft_model(base, lora)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled, SpeedSection(torch_compile=True, torch_compile_backend="counting_inductor"),
                   torch.device("cpu"), print)

    rng = random.Random(0)
    batches = []
    for width in (int(w) for w in args.widths.split(",")):
        lengths = [width] + [rng.randrange(width // 2, width + 1) for _ in range(args.batch - 1)]
        ids = torch.zeros(args.batch, width, dtype=torch.long)
        labels = torch.full((args.batch, width), -100)
        mask = torch.zeros(args.batch, width, dtype=torch.long)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.randint(3, args.vocab, (n,))
            labels[row, n // 3:n] = ids[row, n // 3:n]  # the completion: the last two thirds
            mask[row, :n] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def step(model, batch) -> float:  # noqa: ANN001
        start = time.perf_counter()
        loss = causal_lm_loss(model, batch)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.layers} layers, widths {args.widths} x {args.batch} rows ({tokens} real tokens per pass)")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    start = time.perf_counter()
    for batch in batches:
        step(compiled, batch)
    print(f"compile pass (every width once, compiled): {time.perf_counter() - start:.1f} s, "
          f"{len(graphs)} graphs compiled for {len(batches)} widths")
    step(eager, batches[0])  # eager's own first-call costs
    eager_s = compiled_s = 0.0
    for round_ in range(args.rounds):
        e = c = 0.0
        for batch in batches:
            e += step(eager, batch)
            c += step(compiled, batch)
        eager_s, compiled_s = eager_s + e, compiled_s + c
        print(f"round {round_ + 1}: eager {tokens / e:.0f} tokens/s, compiled {tokens / c:.0f} tokens/s, "
              f"compiled/eager {e / c:.2f}x; load {os.getloadavg()[0]:.1f}")
    print(f"all rounds: eager {tokens * args.rounds / eager_s:.0f} tokens/s, compiled "
          f"{tokens * args.rounds / compiled_s:.0f} tokens/s, compiled/eager {eager_s / compiled_s:.2f}x; "
          f"graphs now {len(graphs)}; load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
