"""Reduced precision on CPU, standing in for a GPU's mixed precision (issue 29): fp16 autocast with torch's CPU
GradScaler (item 10), and bf16 LoRA's trainable weights kept as fp32 master weights ("modules_to_save").
Tiny random Llama; a few seconds (bf16 is emulated on AVX2-only CPUs, so the bf16 run is two tiny steps).
fp16 under DeepSpeed (item 11) is in tests/test_deepspeed.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.data.prepare import Example
from lmforge.models.load import load_model
from lmforge.recipes.finetune import run_train
from lmforge.train.loop import LoopResult, LoopSettings, train_loop
from lmforge.train.loss import causal_lm_loss

EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]), Example([1, 5, 11, 12, 2], [-100, -100, 11, 12, 2])]
STEPS, BAD_STEP = 4, 2


def _fp16_run(tiny_model_dir: Path, bad_loss: float) -> tuple[torch.nn.Module, LoopResult, torch.amp.GradScaler]:
    """STEPS fp16 steps with torch's CPU GradScaler and nan_policy: skip; step BAD_STEP's loss is multiplied by `bad_loss`."""
    model = load_model(str(tiny_model_dir))
    # Plain SGD (no momentum, no decay): a step whose gradients are zero leaves the weights as a skipped step does.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    calls = [0]

    def loss_once_bad(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss, count = causal_lm_loss(model, batch)
        calls[0] += 1
        return (loss * bad_loss if calls[0] == BAD_STEP else loss), count

    settings = LoopSettings(total_steps=STEPS, timing_warmup_steps=0, grad_scaler=scaler, autocast_dtype=torch.float16,
                            nan_policy="skip", show_progress=False)
    batches = iter([collate(EXAMPLES, 0) for _ in range(STEPS)])
    result = train_loop(model, optimizer, scheduler, batches, settings, loss_fn=loss_once_bad)
    return model, result, scaler


def test_fp16_with_nan_policy_skip_trains_on_after_a_non_finite_loss(tiny_model_dir: Path) -> None:
    """Item 10: the skipped step used to leave the scaler unscaled-but-not-updated, so the next step raised
    "unscale_() has already been called on this optimizer since the last update()"."""
    model, result, scaler = _fp16_run(tiny_model_dir, float("inf"))
    assert result.steps == STEPS and result.skipped_steps == [BAD_STEP]
    # The reference: the same run whose bad step had zero gradients (with plain SGD: the weights stay put).
    reference, ref_result, ref_scaler = _fp16_run(tiny_model_dir, 0.0)
    assert ref_result.skipped_steps == []
    good = [(s, loss) for s, loss in result.train_history if s != BAD_STEP]
    assert good == [(s, loss) for s, loss in ref_result.train_history if s != BAD_STEP]
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, ref, msg=name)
    assert scaler.get_scale() == ref_scaler.get_scale() / 2  # the skipped step lowered the loss scale, as an overflow does


def test_bf16_lora_keeps_modules_to_save_as_fp32_master_weights(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """A trained copy of the output head (lora_modules_to_save) is an fp32 master weight under bf16, like the LoRA
    weights: a learning-rate-sized update survives. In bf16 it rounded away wherever it was under half a bf16 step."""
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", bf16=True, lora_modules_to_save=["lm_head"],
                         learning_rate=1e-5, max_steps=2, micro_batch_size=2, save_strategy="no")
    run_train(load_config(str(write_config(tmp_path / "c.yml", config))))
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    head = next(t for k, t in adapter.items() if "lm_head" in k)
    assert head.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in adapter.values())
    start = load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"].to(torch.bfloat16).float()  # as loaded
    moved = (head != start).float().mean().item()
    assert moved > 0.95, f"only {moved:.0%} of the head's weights moved: updates were rounded away"
