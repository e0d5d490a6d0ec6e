"""DeepSpeed ZeRO on 2 CPU ranks (its CPU accelerator, gloo): ZeRO-2 and ZeRO-3 train as one process with
the same global batch, the ZeRO-3 adapter is saved whole (not the empty-adapter trap), ZeRO-3 saves gather
one module at a time, a fused output-head loss sees the whole head under ZeRO-3, and a ZeRO-3
checkpoint resumes to the uninterrupted weights.

In one process (a gloo group of one, as `lmforge train` without a launcher makes): every optimizer name
lmforge accepts steps under ZeRO-2 and ZeRO-3, and fp16 is DeepSpeed's loss scaling, not a GradScaler.
One launch runs many configs (tests/deepspeed_checks.py, which records what the spies saw).

Skipped where deepspeed is not installed (`pip install 'lmforge[deepspeed]'`); slow: its first use on a
machine JIT-builds a small C++ shared-memory op (minutes on 2 cores, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARITHMETIC, REPO, write_config, write_jsonl
from lmforge.config.checks import ZERO_INCOMPATIBLE_OPTIMIZERS
from lmforge.errors import LmforgeError
from lmforge.config import load_config
from lmforge.config.sections import TrainingSection
from lmforge.recipes.finetune import run_train
from test_distributed import _assert_close_runs, _config, _env, _history, _torchrun, _weights

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

KINDS = {"zero2-lora": "zero2.json", "zero3-lora": "zero3.json", "zero3-full": "zero3.json"}
CHECKS = REPO / "tests" / "deepspeed_checks.py"
# Every optimizer DeepSpeed is allowed with (the ones needing each weight's shape are refused: the test below).
OPTIMIZERS = tuple(o for o in typing.get_args(TrainingSection.model_fields["optimizer"].annotation)
                   if o not in ZERO_INCOMPATIBLE_OPTIMIZERS)
# Optimizers whose update is elementwise per weight: on DeepSpeed's flat partitions they compute what they do
# without ZeRO. bitsandbytes' 8-bit states are quantized in blocks of the flat partition instead of per weight.
ELEMENTWISE = {"adamw_torch", "adamw_torch_fused", "adamw", "adamw_hf", "sgd", "lion_32bit"}


def _ds_config(model_dir: Path, data: Path, out: Path, kind: str, accumulation: int, **extra: object) -> dict:
    stage, adapter = kind.split("-")
    json_file = REPO / "deepspeed_configs" / KINDS[kind]
    return _config(model_dir, data, out, f"{stage}-{adapter}", accumulation, deepspeed=str(json_file), **extra)


@pytest.fixture(scope="module")
def ds_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepspeed")
    data = write_jsonl(root / "arith.jsonl", ARITHMETIC)
    folders: dict[str, Path] = {"root": root, "data": data}
    for adapter in ("lora", "full"):
        out = folders[f"ref-{adapter}"] = root / f"ref-{adapter}"
        run_train(load_config(str(write_config(root / f"ref-{adapter}.yml", _config(tiny_model_dir, data, out, f"one-{adapter}", 4)))))
    configs = []
    for kind in KINDS:
        folders[kind] = root / kind
        configs.append(str(write_config(root / f"{kind}.yml", _ds_config(tiny_model_dir, data, root / kind, kind, 2))))
    # zero3-full again, with a fused output-head loss (the pure-torch Liger stand-in of deepspeed_checks.py)
    folders["zero3-fused"] = root / "zero3-fused"
    fused = _ds_config(tiny_model_dir, data, root / "zero3-fused", "zero3-full", 2, liger_fused_linear_cross_entropy=True)
    configs.append(str(write_config(root / "zero3-fused.yml", fused)))
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", str(CHECKS), str(root / "results.json"), *configs),
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    folders["results"] = json.loads((root / "results.json").read_text())
    return folders


def _result(runs: dict, name: str) -> dict:
    result = runs["results"][name]
    assert result["error"] is None, f"{name}: {result['error']}"
    return result


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_on_two_cpu_ranks_trains_as_one_process(kind: str, ds_runs: dict[str, Path]) -> None:
    _result(ds_runs, kind)
    out = ds_runs[kind]
    _assert_close_runs(out, ds_runs[f"ref-{kind.split('-')[1]}"])
    weights = _weights(out)
    assert weights and all(t.numel() > 0 for t in weights.values())  # ZeRO-3 partitions gathered before saving
    assert (out / "checkpoint-2" / "deepspeed").is_dir()


def test_zero3_checkpoint_resumes_to_the_uninterrupted_weights(tiny_model_dir: Path, ds_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ds_runs["zero3-full"] / "checkpoint-4", out / "checkpoint-4")
    config = write_config(tmp_path / "r.yml", _ds_config(tiny_model_dir, ds_runs["data"], out, "zero3-full", 2,
                                                         resume_from_checkpoint="auto"))
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", "-m", "lmforge", "train", str(config)),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resumed from" in done.stdout
    _assert_close_runs(out, ds_runs["zero3-full"], atol=1e-6)


@pytest.mark.parametrize("kind", ["zero3-full", "zero3-lora"])
def test_zero3_saves_gather_one_module_at_a_time(kind: str, ds_runs: dict, tiny_model_dir: Path) -> None:
    """Item 9: saving under ZeRO-3 gathered every weight at once on every rank (the whole model in each rank's
    memory); now one module's own weights at a time, copied to CPU on rank 0 only."""
    from transformers import LlamaForCausalLM

    largest = _result(ds_runs, kind)["largest_gather"]
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    whole = sum(p.numel() for p in model.parameters())
    assert largest <= largest_module < layer < whole, f"a gather held {largest} elements (one layer: {layer}, model: {whole})"
    if kind == "zero3-lora":  # only the adapter is saved: no frozen base weight is gathered for it
        adapter = load_file(str(ds_runs[kind] / "adapter_model.safetensors"))
        assert largest <= sum(t.numel() for t in adapter.values()) / 4


def test_fused_head_loss_sees_the_whole_head_under_zero3(ds_runs: dict) -> None:
    """Item 5: Liger's and Cut Cross-Entropy's losses read lm_head.weight without calling the head, which under
    ZeRO-3 is an empty shard outside a gather. lmforge runs the loss as the DeepSpeed engine's forward
    (DeepSpeedEngine.call), where ZeRO-3 gathers a weight read this way (its external-parameter discovery) and
    gathers it again for backward. A pure-torch stand-in for the kernel (it refuses an empty weight and keeps
    the weight for backward, as Cut Cross-Entropy does) trains exactly as the plain loss on 2 ranks."""
    fused = _result(ds_runs, "zero3-fused")
    assert fused.get("fused_calls", 0) > 0, "the fused stand-in never ran"
    ours, plain = _history(ds_runs["zero3-fused"]), _history(ds_runs["zero3-full"])
    assert [s for s, _ in ours] == [s for s, _ in plain]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, plain)) < 1e-5
    weights, reference = _weights(ds_runs["zero3-fused"]), _weights(ds_runs["zero3-full"])
    for name in reference:  # the head's gradient reached the head (its weights match the plain loss's)
        torch.testing.assert_close(weights[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ one process: every optimizer, fp16

FP16_STEPS = 4


@pytest.fixture(scope="module")
def ds_sweep(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process (no launcher: `lmforge train` on one GPU) runs: per optimizer name, a LoRA run without DeepSpeed
    and under ZeRO-2 and ZeRO-3 (2 steps); fp32 and fp16 under ZeRO-2, and fp16 whose loss scale starts at 2**32."""
    root = tmp_path_factory.mktemp("deepspeed-sweep")
    data = write_jsonl(root / "arith.jsonl", ARITHMETIC)
    overflow = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    overflow["fp16"] = {"enabled": "auto", "initial_scale_power": 32, "hysteresis": 1}  # overflows until the scale drops
    (root / "zero2-overflow.json").write_text(json.dumps(overflow))
    runs: dict[str, dict] = {}
    for optimizer in OPTIMIZERS:
        for stage in ("none", "zero2", "zero3"):
            runs[f"{stage}-{optimizer}"] = dict(optimizer=optimizer, max_steps=2, deepspeed=stage)
    runs["none-fp32"] = dict(max_steps=FP16_STEPS, deepspeed="none")
    runs["zero2-fp16"] = dict(max_steps=FP16_STEPS, deepspeed="zero2", fp16=True)
    runs["zero2-fp16-overflow"] = dict(max_steps=FP16_STEPS, deepspeed=str(root / "zero2-overflow.json"), fp16=True)
    configs = []
    for name, extra in runs.items():
        stage = extra.pop("deepspeed")
        if stage != "none":
            extra["deepspeed"] = stage if stage.endswith(".json") else str(REPO / "deepspeed_configs" / f"{stage}.json")
        config = _config(tiny_model_dir, data, root / name, "one-lora", 1, save_strategy="no", val_set_size=0,
                         eval_steps=None, save_steps=None, **extra)
        configs.append(str(write_config(root / f"{name}.yml", {k: v for k, v in config.items() if v is not None})))
    done = subprocess.run([sys.executable, str(CHECKS), str(root / "results.json"), *configs], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return {"root": root, "results": json.loads((root / "results.json").read_text()), "stdout": done.stdout}


def _adapter(sweep: dict, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(sweep["root"] / name / "adapter_model.safetensors"))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_steps_under_zero(optimizer: str, stage: str, ds_sweep: dict) -> None:
    """Item 4: deepspeed.initialize refused every optimizer outside its ZeRO list (bitsandbytes' 8-bit AdamW and Lion,
    SGD, Adafactor) with its untested-optimizer assertion; lmforge passes its own optimizer and now says so."""
    result = _result(ds_sweep, f"{stage}-{optimizer}")
    assert result["ds_allows_client_optimizer"]
    ours, plain = _adapter(ds_sweep, f"{stage}-{optimizer}"), _adapter(ds_sweep, f"none-{optimizer}")
    assert ours.keys() == plain.keys()
    b_weights = [k for k in ours if "lora_B" in k]  # zero at the start: nonzero only if the optimizer stepped
    assert all(ours[k].abs().max() > 0 for k in b_weights), "the optimizer never stepped"
    moved = torch.cat([ours[k].flatten() for k in b_weights])
    expected = torch.cat([plain[k].flatten() for k in b_weights])
    if optimizer in ELEMENTWISE:
        for name in plain:
            close = torch.isclose(ours[name], plain[name], atol=1e-5, rtol=1e-4).float().mean()
            # AdamW's first step and Lion's every step are ±lr by sign: a gradient element at ~0 may flip sign where
            # DeepSpeed's flat sums differ in the last bit, so "equal" allows a stray element per tensor.
            assert close > 0.99, f"{name}: only {close:.1%} of the weights match the run without DeepSpeed"
    elif optimizer == "adafactor":  # unfactored on the flat partitions: a different update, and the run says so
        assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.5
        assert "adafactor under DeepSpeed ZeRO" in ds_sweep["stdout"]
    else:  # 8-bit states, quantized in other blocks: the same direction
        assert torch.nn.functional.cosine_similarity(moved, expected, dim=0) > 0.99


def test_fp16_under_deepspeed_is_its_own_loss_scaling(ds_sweep: dict) -> None:
    """Item 11: fp16 made a torch GradScaler beside DeepSpeed, whose first step raised "No inf checks were recorded".
    Now the JSON's fp16 section is on (DeepSpeed's dynamic loss scaling) and the loop has no GradScaler; an overflow
    is DeepSpeed's to skip (the scale starts at 2**32 in the second run), not a non-finite step that stops the run."""
    result = ds_sweep["results"]["zero2-fp16"]
    assert result["ds_fp16"] is True
    if result["error"] and "fp16 is not supported" in result["error"]:
        pytest.skip("DeepSpeed's CPU accelerator has no fp16 on this CPU (oneDNN fp16 needs AVX512-FP16 or AMX-FP16): "
                    "the wiring is checked by test_fp16_under_deepspeed_makes_no_grad_scaler; the GPU check runs it")
    _result(ds_sweep, "zero2-fp16")
    assert result["grad_scaler"] is False
    fp16, fp32 = (json.loads((ds_sweep["root"] / n / "summary.json").read_text()) for n in ("zero2-fp16", "none-fp32"))
    assert fp16["steps"] == FP16_STEPS and fp16["skipped_steps"] == []
    assert abs(fp16["final_train_loss"] - fp32["final_train_loss"]) < 0.02
    overflow = _result(ds_sweep, "zero2-fp16-overflow")
    assert overflow["loss_scaler_skips"] >= 1
    summary = json.loads((ds_sweep["root"] / "zero2-fp16-overflow" / "summary.json").read_text())
    assert summary["steps"] == FP16_STEPS and summary["skipped_steps"] == []


def test_fp16_under_deepspeed_makes_no_grad_scaler(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11's wiring, on every CPU: a DeepSpeed run's loop gets no GradScaler and its DeepSpeed config turns
    on fp16 (a run without DeepSpeed keeps torch's GradScaler)."""
    import lmforge.recipes.run as training
    from lmforge.recipes.run import StepCounts, TrainingRun
    from lmforge.train.deepspeed import resolve_auto

    monkeypatch.setattr(training, "FP16_DEVICE_TYPES", ("cuda", "cpu"))  # fp16 is refused off CUDA
    plan = StepCounts(1, 1, 0, None, None)
    for deepspeed, scaler in ((str(REPO / "deepspeed_configs" / "zero2.json"), False), (None, True)):
        extra = {"deepspeed": deepspeed} if deepspeed else {}
        config = _config(tiny_model_dir, alpaca_file, tmp_path / "out", "one-lora", 1, fp16=True, **extra)
        cfg = load_config(str(write_config(tmp_path / "c.yml", config)), gpu=True)
        run = TrainingRun(cfg)
        try:
            assert (run.loop_settings(plan).grad_scaler is not None) is scaler
            if deepspeed:
                resolved = resolve_auto(run.engine.config, cfg, 1, run.bf16, None, fp16=run.fp16)
                assert resolved["fp16"]["enabled"] is True and resolved["bf16"]["enabled"] is False
        finally:
            run.engine.close()


@pytest.mark.parametrize("optimizer", sorted(ZERO_INCOMPATIBLE_OPTIMIZERS))
def test_optimizers_that_need_whole_weights_are_refused_under_zero(optimizer: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(f"base_model: {tmp_path}\ndatasets:\n  - path: x.jsonl\n    type: alpaca\noutput_dir: {tmp_path / 'o'}\n"
                    f"optimizer: {optimizer}\ndeepspeed: deepspeed_configs/zero2.json\n")
    with pytest.raises(LmforgeError) as exc:
        load_config(str(path))
    assert f"optimizer {optimizer} cannot step under DeepSpeed ZeRO" in exc.value.message
