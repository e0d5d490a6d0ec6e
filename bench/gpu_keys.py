"""GPU check of issue 10's CUDA-only keys (not run in CI: no GPU there). Prints one table row per check.

    pip install liger-kernel cut-cross-entropy flash-attn   # whichever you want checked; missing ones are skipped
    python bench/gpu_keys.py            # about a minute on one GPU

Each row compares a key's path against the plain one on the same packed batch of a small random Llama:
attention backends (packed rows apart: loss equal to the per-example sum), fp16 with a gradient scaler,
activation offloading (same gradients), torch.compile (inductor), Liger's module kernels and fused loss,
Cut Cross-Entropy.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.config.sections import SpeedSection  # noqa: E402
from lmforge.data.batching import collate, collate_packed  # noqa: E402
from lmforge.data.prepare import IGNORE_INDEX, Example  # noqa: E402
from lmforge.models import kernels  # noqa: E402
from lmforge.train.loop import LoopSettings, train_loop  # noqa: E402
from lmforge.train.loss import causal_lm_loss  # noqa: E402

CUDA = torch.device("cuda")


def model(attn: str = "sdpa", dtype: torch.dtype = torch.float32):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(CUDA, dtype)


def examples(n: int = 8) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(4, 512, (20 + 7 * i,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 5 + ids[5:]))
    return out


def to(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


def row(name: str, ok: bool, detail: str) -> None:
    print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |", flush=True)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options; --help says what it is
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}\n\n| check | result | detail |\n|---|---|---|")
    ex = examples()
    packed, alone = to(collate_packed([ex[:4], ex[4:]], 0)), [to(collate([e], 0)) for e in ex]
    for attn in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            row(f"attn {attn}", True, "skipped: flash-attn not installed")
            continue
        dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
        m = model(attn, dtype).eval()
        with torch.no_grad():
            p = float(causal_lm_loss(m, packed)[0])
            s = sum(float(causal_lm_loss(m, b)[0]) for b in alone)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
        row(f"attn {attn}: packed rows apart", abs(p - s) / s < tol, f"packed {p:.4f} vs per-example {s:.4f}")

    def loop(m, steps: int = 3, **settings):  # noqa: ANN001, ANN202, ANN003
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        batches = iter([collate(ex[:4], 0) for _ in range(steps)])
        return train_loop(m, opt, sched, batches, LoopSettings(total_steps=steps, device=CUDA, timing_warmup_steps=0, **settings))

    scaler = torch.amp.GradScaler("cuda")
    r = loop(model(), grad_scaler=scaler, autocast_dtype=torch.float16)
    row("fp16 + GradScaler", r.steps == 3 and r.train_history[-1][1] < r.train_history[0][1],
        f"loss {r.train_history[0][1]:.3f} -> {r.train_history[-1][1]:.3f}, scale {scaler.get_scale():.0f}")
    a, b = model(), model()
    loop(a), loop(b, offload_activations=True)
    same = all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.parameters(), b.parameters()))
    row("activation_offloading (save_on_cpu)", same, "weights after 3 steps equal to plain")

    m, plain = model(), model()
    n = kernels.compile_layers(m, SpeedSection(torch_compile=True), CUDA, print)
    started = time.perf_counter()
    with torch.no_grad():
        c, p = float(causal_lm_loss(m, packed)[0]), float(causal_lm_loss(plain, packed)[0])
    row("torch_compile (inductor, per layer)", n == 2 and abs(c - p) / p < 1e-3, f"{c:.4f} vs {p:.4f}, {time.perf_counter() - started:.1f}s")

    if importlib.util.find_spec("liger_kernel"):
        m, plain = model(), model()
        applied = kernels.apply_liger(m, SpeedSection(liger_rope=True, liger_rms_norm=True, liger_glu_activation=True), CUDA, print)
        with torch.no_grad():
            c, p = float(causal_lm_loss(m, packed)[0]), float(causal_lm_loss(plain, packed)[0])
        row("liger rope/rms_norm/glu", len(applied) == 3 and abs(c - p) / p < 1e-3, f"{c:.4f} vs {p:.4f}, {type(m.model.norm).__name__}")
        f = float(causal_lm_loss(plain, packed, fused="liger")[0])
        row("liger fused linear cross-entropy", abs(f - p) / p < 1e-3, f"{f:.4f} vs {p:.4f}")
    else:
        row("liger", True, "skipped: liger-kernel not installed")
    if importlib.util.find_spec("cut_cross_entropy"):
        m = model(dtype=torch.bfloat16)
        with torch.no_grad():
            f, p = float(causal_lm_loss(m, packed, fused="cce")[0]), float(causal_lm_loss(m, packed)[0])
        row("cut cross-entropy", abs(f - p) / p < 2e-2, f"{f:.4f} vs {p:.4f} (bf16)")
    else:
        row("cut_cross_entropy", True, "skipped: cut-cross-entropy not installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
