"""torch_compile (issue 28): one graph for every sequence length, and the same loss and gradients as eager.

Before, each decoder layer recompiled at the second sequence length (and again for layer 0, whose input had no
requires_grad under LoRA): minutes of inductor work per new shape, which made a compiled LoRA run slower
than an eager one. The graph count is dynamo's, so a backend that compiles nothing counts it in seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.data.prepare import Example
from lmforge.models.load import load_tokenizer
from lmforge.models.setup import training_model
from lmforge.train.loss import causal_lm_loss

CPU = torch.device("cpu")
GRAPHS: list[int] = []  # one entry per graph dynamo hands the counting backend


def _counting_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    GRAPHS.append(len(example_inputs))
    return graph.forward


if "lmforge_counting" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_backend, "lmforge_counting")


def _model(model_dir: Path, data: Path, tmp_path: Path, **extra: object) -> Any:
    cfg = load_config(str(write_config(tmp_path / "config.yml", tiny_config(model_dir, data, tmp_path / "out", **extra))))
    torch.manual_seed(0)  # the same LoRA init for the compiled and the eager model
    return training_model(cfg, load_tokenizer(str(model_dir)), CPU, bf16=False)


def _batches(count: int, vocab: int, rows: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches, each of a new width (every one padded, so each carries an attention mask)."""
    rng = random.Random(seed)
    widths = rng.sample(range(6, 60), count)
    batches = []
    for width in widths:
        examples = []
        for row in range(rows):
            ids = [rng.randrange(3, vocab) for _ in range(width - 3 * row)]
            examples.append(Example(ids, [-100, -100] + ids[2:]))
        batches.append(collate(examples, 0))
    return batches


def test_torch_compile_makes_one_graph_for_every_sequence_length(tiny_model_dir: Path, alpaca_file: Path,
                                                                 tmp_path: Path) -> None:
    torch._dynamo.reset()
    GRAPHS.clear()
    model = _model(tiny_model_dir, alpaca_file, tmp_path, torch_compile=True, torch_compile_backend="lmforge_counting")
    vocab = model.get_input_embeddings().num_embeddings
    for batch in _batches(8, vocab):
        causal_lm_loss(model, batch)[0].backward()
    # main compiled 4 here: layer 0 apart from the rest, each first static then dynamic in the length
    assert len(GRAPHS) == 1
    # A batch without padding (no mask) and a one-row batch are other guards: one graph each, still not per length
    for batch in _batches(3, vocab, rows=1, seed=1):
        causal_lm_loss(model, batch)[0].backward()
    assert len(GRAPHS) <= 3


# inductor (the default backend) is checked by bench/compile_ab.py: its compile takes minutes on this CPU.
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_trains_like_eager(tiny_lora_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                         backend: str) -> None:
    """Three LoRA steps on batches of three widths: loss and every gradient within 1e-5 (fp32) of eager.

    aot_eager traces forward and backward as inductor does but runs the ops unfused; inductor (slow: minutes
    of C++ compilation on a busy 2-core CPU) checks its generated kernels too.
    """
    torch._dynamo.reset()
    eager = _model(tiny_lora_model_dir, alpaca_file, tmp_path)
    compiled = _model(tiny_lora_model_dir, alpaca_file, tmp_path, torch_compile=True, torch_compile_backend=backend)
    vocab = eager.get_input_embeddings().num_embeddings
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, compiled)]
    for batch in _batches(3, vocab):
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            loss = causal_lm_loss(model, batch)[0]
            loss.backward()
            losses.append(float(loss))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-5)
        grads = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
        assert grads and any(g.abs().sum() > 0 for g in grads.values())
        for name, param in eager.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-5, msg=name)
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_on_cpu_is_fused_and_steps_as_the_per_tensor_default(dtype: torch.dtype) -> None:
    """build_optimizer's CPU AdamW is torch's fused kernel (3x the per-tensor default on LoRA's many small tensors,
    issue 28) and lands where the per-tensor AdamW lands: within 1e-6 after five steps (bf16: within one rounding)."""
    from lmforge.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 5)).to(dtype)
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    fused = build_optimizer(model, "adamw_torch", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    assert all(group["fused"] for group in fused.param_groups)
    per_tensor = torch.optim.AdamW([{"params": [reference[0], reference[4]], "weight_decay": 0.1},
                                    {"params": [reference[i] for i in (1, 2, 3, 5)], "weight_decay": 0.0}],
                                   lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in reference]
        for param, ref, grad in zip(model.parameters(), reference, grads):
            param.grad, ref.grad = grad.clone(), grad.clone()
        fused.step()
        per_tensor.step()
    tolerance = 1e-6 if dtype == torch.float32 else 1.6e-2  # bf16: its 8-bit mantissa
    for param, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=tolerance, atol=tolerance)
