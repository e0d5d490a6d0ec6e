"""The CUDA paths, run on a CPU (issue 29): what a GPU run would decide and compute, checked without one.

Two stand-ins make the CUDA branches run here:
- a CPU flash-attention: transformers' own flash dispatch (``_flash_attention_forward``: padding,
  packed rows, varlen or not) runs unchanged, and only the kernels under it are swapped for a
  reference (causal SDPA for ``flash_attn_func``, SDPA per segment for ``flash_attn_varlen_func``);
- a mocked CUDA: ``torch.cuda.is_available`` and the device's properties and capability (sm 7.0,
  8.0, 9.0) patched, so device selection, bf16 resolution, the planner's hardware row and the
  kernel decisions take their CUDA branches.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.batching import collate, iterate_batches, pad_batch
from lmforge.data.prepare import IGNORE_INDEX, Example
from lmforge.train.loss import causal_lm_loss

# --- a CPU stand-in for flash-attention -------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """flash_attn's layout (batch, length, heads, head_dim) in and out; grouped kv heads as flash_attn takes them."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.fixture
def cpu_flash_attention(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make attn_implementation flash_attention_2 run on this CPU through transformers' own flash dispatch."""
    import transformers.modeling_flash_attention_utils as fa

    calls: dict[str, Any] = {"dense": 0, "varlen": 0, "segments": []}

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),  # noqa: ANN001, ANN202
                        softcap=0.0, deterministic=False):
        calls["dense"] += 1
        return _sdpa(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,  # noqa: ANN001, ANN202
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
        calls["varlen"] += 1
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        bounds = cu_seqlens_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.shape[0]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        assert max(lengths) <= int(max_seqlen_q)  # the kernel sizes its grid by it: an upper bound is enough
        calls["segments"].append(len(lengths))
        return torch.cat([_sdpa(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
                          for a, b in zip(bounds, bounds[1:])])

    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (flash_attn_func, flash_attn_varlen_func, None,
                                                               fa._pad_input, fa._unpad_input))
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    return calls


def _random_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _flash_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.config._attn_implementation = "flash_attention_2"  # what loading with it does on a GPU (no CUDA check here)
    return model


@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_packed_loss_equals_per_example_loss_under_flash_attention(tiny_model_dir: Path, cpu_flash_attention: dict,
                                                                   micro_batch_size: int) -> None:
    """Item 1: flash_attention + sample_packing + micro_batch_size > 1 must not let packed examples see each other."""
    model = _flash_model(tiny_model_dir)
    examples = _random_examples(24, model.config.vocab_size)
    with torch.no_grad():
        alone = [causal_lm_loss(model, collate([e], 0)) for e in examples]
        packed = [causal_lm_loss(model, b) for b in iterate_batches(examples, micro_batch_size, 0, seed=1, epoch=0,
                                                                     sequence_len=48)]
        padded = [causal_lm_loss(model, pad_batch(b, 64, 0))
                  for b in iterate_batches(examples, micro_batch_size, 0, seed=1, epoch=0, sequence_len=48)]
    count = sum(c for _, c in alone)
    assert sum(c for _, c in packed) == count
    per_example = sum(float(s) for s, _ in alone) / count
    assert sum(float(s) for s, _ in packed) / count == pytest.approx(per_example, abs=1e-5)
    assert sum(float(s) for s, _ in padded) / count == pytest.approx(per_example, abs=1e-5)  # pad_to_sequence_len
    assert cpu_flash_attention["varlen"] > 0  # the flash dispatch ran, not sdpa
    assert max(cpu_flash_attention["segments"]) > 2  # and segments were packed (per row, or over the rows)


def test_padded_batches_under_flash_attention_equal_per_example_loss(tiny_model_dir: Path, cpu_flash_attention: dict) -> None:
    """Without packing, a padded batch of 4 goes through transformers' unpadding into the varlen kernel."""
    model = _flash_model(tiny_model_dir)
    examples = _random_examples(8, model.config.vocab_size, seed=3)
    with torch.no_grad():
        alone = sum(float(causal_lm_loss(model, collate([e], 0))[0]) for e in examples)
        batched = sum(float(causal_lm_loss(model, collate(examples[i:i + 4], 0))[0]) for i in range(0, 8, 4))
    assert cpu_flash_attention["varlen"] > 0 and cpu_flash_attention["dense"] > 0
    assert batched == pytest.approx(alone, rel=1e-5)
