"""Issue 10's keys, each shown to change what lmforge does (not only that a config with it validates).

Tiny random Llama; a few seconds in all. GPU-only paths (fp16 with CUDA, Liger, Cut Cross-Entropy,
flash attention) are checked here for their CPU behaviour and their refusals; bench/gpu_keys.py
runs them on a GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate, collate_packed, iterate_batches, pad_batch
from lmforge.data.prepare import IGNORE_INDEX, Example, prepare
from lmforge.errors import LmforgeError
from lmforge.models import kernels
from lmforge.models.load import load_model, load_tokenizer
from lmforge.models.setup import training_model
from lmforge.recipes.finetune import run_train
from lmforge.recipes.run import TrainingRun, count_steps
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import LoopSettings, train_loop
from lmforge.train.loss import causal_lm_loss
from lmforge.device import set_tf32

CPU = torch.device("cpu")
EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]), Example([1, 5, 11, 12, 2], [-100, -100, 11, 12, 2])]


def _cfg(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, gpu: bool = False, **extra: object):  # noqa: ANN202
    path = write_config(tmp_path / "config.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", **extra))
    return load_config(str(path), gpu=gpu)


def _model(tiny_model_dir: Path, **kwargs: object):  # noqa: ANN202
    return load_model(str(tiny_model_dir), **kwargs)


def _run_loop(model, steps: int, loss_fn=causal_lm_loss, **settings):  # noqa: ANN001, ANN202
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = iter([collate(EXAMPLES, 0) for _ in range(steps)])
    return train_loop(model, optimizer, scheduler, batches, LoopSettings(total_steps=steps, timing_warmup_steps=0, **settings),
                      loss_fn=loss_fn)


# --- attention ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, runs", [("eager", "eager"), ("sdpa", "sdpa"), ("flash_attention_2", "sdpa"),
                                             ("flex_attention", "sdpa")])
def test_attn_implementation_is_the_backend_the_model_runs(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                           requested: str, runs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmforge.config.checks._installed", lambda module: True)  # the GPU machine has flash-attn
    validated_here = _cfg(tiny_model_dir, alpaca_file, tmp_path, attn_implementation=requested)
    assert validated_here.model.attn_implementation == runs  # validate on this machine already says and records it
    assert [n.key for n in validated_here.notices] == ([] if requested == runs else ["attn_implementation"])
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, attn_implementation=requested)  # validated on a GPU machine
    said: list[str] = []
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False, say=said.append)
    assert model.get_base_model().config._attn_implementation == runs
    assert [line for line in said if "attn_implementation" in line] == (
        [] if requested == runs else [f"attn_implementation: {requested} needs CUDA and the device is cpu: attention runs as sdpa "
                                      "(the same math; packed rows stay apart)"])


@pytest.mark.parametrize("requested", ["sdpa", "flash_attention_2"])
def test_an_architecture_without_sdpa_runs_eager_instead(alpaca_file: Path, tmp_path: Path, requested: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma2 has no sdpa in transformers: sdpa, and flash_attention_2's CPU fallback, load it as eager (axolotl's
    gemma2/qlora.yml asks for flash_attention_2 and stopped with transformers' ValueError on CPU)."""
    from conftest import build_tiny_tokenizer
    from transformers import Gemma2Config, Gemma2ForCausalLM

    monkeypatch.setattr("lmforge.config.checks._installed", lambda module: True)  # the GPU machine has flash-attn
    folder = tmp_path / "tiny-gemma2"
    size = len(build_tiny_tokenizer(folder))
    Gemma2ForCausalLM(Gemma2Config(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, attn_implementation="eager")).save_pretrained(folder)
    cfg = _cfg(folder, alpaca_file, tmp_path, gpu=True, attn_implementation=requested)
    said: list[str] = []
    model = training_model(cfg, load_tokenizer(str(folder)), CPU, bf16=False, say=said.append)
    assert model.get_base_model().config._attn_implementation == "eager"
    assert "attn_implementation: this architecture has no sdpa attention in transformers: attention runs as eager" in said


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_rows_stay_apart_on_every_backend(tiny_model_dir: Path, backend: str) -> None:
    model = _model(tiny_model_dir, attn_implementation=backend).eval()
    a, b = EXAMPLES
    with torch.no_grad():
        packed, n = causal_lm_loss(model, collate_packed([[a, b]], 0))
        alone = [causal_lm_loss(model, collate([e], 0)) for e in (a, b)]
        leaky, _ = causal_lm_loss(model, {k: v for k, v in collate_packed([[a, b]], 0).items() if k != "position_ids"})
    assert n == sum(c for _, c in alone)
    assert float(packed) == pytest.approx(sum(float(s) for s, _ in alone), abs=1e-4)
    assert abs(float(leaky) - float(packed)) > 1e-3  # the check can fail: without the block mask b sees a


# --- model building keys ----------------------------------------------------------------------------------------------

def test_gradient_checkpointing_kwargs_reach_torch_checkpoint(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    def checkpoint_kwargs(model):  # noqa: ANN001, ANN202
        layer = model.get_base_model().model.layers[0]
        return layer._gradient_checkpointing_func.keywords

    tok = load_tokenizer(str(tiny_model_dir))
    default = training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path, gradient_checkpointing=True), tok, CPU, bf16=False)
    assert checkpoint_kwargs(default) == {"use_reentrant": False}
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, gradient_checkpointing=True,
               gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    assert checkpoint_kwargs(training_model(cfg, tok, CPU, bf16=False)) == {"use_reentrant": True, "preserve_rng_state": False}


def test_model_type_and_tokenizer_type_name_the_classes_loaded(tiny_model_dir: Path) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    assert type(_model(tiny_model_dir, model_type="LlamaForCausalLM")) is LlamaForCausalLM
    assert type(load_tokenizer(str(tiny_model_dir), tokenizer_type="PreTrainedTokenizerFast")) is PreTrainedTokenizerFast
    with pytest.raises(LmforgeError, match="model_type: LlamaTokenizer is not a transformers model class"):
        _model(tiny_model_dir, model_type="LlamaTokenizer")
    with pytest.raises(LmforgeError, match="tokenizer_type: Nope is not a transformers tokenizer class"):
        load_tokenizer(str(tiny_model_dir), tokenizer_type="Nope")


def test_base_model_config_is_the_config_the_model_is_built_with(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-config"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 0.125
    (other / "config.json").write_text(json.dumps(config))
    assert _model(tiny_model_dir).config.rms_norm_eps != 0.125
    assert _model(tiny_model_dir, config_source=str(other)).config.rms_norm_eps == 0.125


def test_torch_compile_compiles_each_decoder_layer_and_keeps_the_loss(tiny_model_dir: Path, alpaca_file: Path,
                                                                      tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    plain = training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path), tok, CPU, bf16=False)
    said: list[str] = []
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, torch_compile=True, torch_compile_backend="eager")
    compiled = training_model(cfg, tok, CPU, bf16=False, say=said.append)
    layers = compiled.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers) and "2 decoder layers compiled (eager" in said[-1]
    assert plain.get_base_model().model.layers[0]._compiled_call_impl is None
    batch = collate(EXAMPLES, 0)
    with torch.no_grad():
        assert float(causal_lm_loss(compiled, batch)[0]) == pytest.approx(float(causal_lm_loss(plain, batch)[0]), rel=1e-5)
    assert dict(compiled.named_parameters()).keys() == dict(plain.named_parameters()).keys()  # names (and checkpoints) unchanged


# --- GPU kernels: what runs on CPU, and the refusal without the package ----------------------------------------------

def test_liger_and_cut_cross_entropy_say_what_runs_on_cpu(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, liger_rms_norm=True, liger_glu_activation=True,
               liger_fused_linear_cross_entropy=True)
    said: list[str] = []
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False, say=said.append)
    assert type(model.get_base_model().model.norm).__name__ == "LlamaRMSNorm"  # the plain module stays
    assert any(line.startswith("liger_rms_norm, liger_glu_activation: Liger's kernels need CUDA") for line in said)
    said.clear()
    assert kernels.fused_loss(cfg.speed, CPU, said.append) is None and "the same loss" in said[0]


def test_gpu_kernels_without_their_package_are_refused_by_key(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed (import fails)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    cuda = torch.device("cuda")
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, liger_rope=True)
    with pytest.raises(LmforgeError, match="liger_rope needs the liger-kernel package") as err:
        kernels.apply_liger(_model(tiny_model_dir), cfg.speed, cuda, print)
    assert "pip install liger-kernel" in err.value.fix
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, cut_cross_entropy=True)
    with pytest.raises(LmforgeError, match="cut_cross_entropy needs the cut-cross-entropy package"):
        kernels.fused_loss(cfg.speed, cuda, print)


# --- loop keys ------------------------------------------------------------------------------------------------------

def test_activation_offloading_saves_activations_on_the_host_with_the_same_gradients(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.train import loop

    entered = []

    class Counting(loop.OffloadActivations):
        def __init__(self, **kwargs: bool) -> None:
            entered.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(loop, "OffloadActivations", Counting)
    plain, offloaded = _model(tiny_model_dir), _model(tiny_model_dir)
    _run_loop(plain, 2)
    assert entered == []
    _run_loop(offloaded, 2, offload_activations=True)
    assert len(entered) == 2 and entered[0] == {"pin_memory": False}
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
        assert torch.equal(a, b), name


def test_loss_watchdog_stops_after_patience_steps_above_the_threshold(tiny_model_dir: Path) -> None:
    def exploding(model, batch):  # noqa: ANN001, ANN202
        loss, count = causal_lm_loss(model, batch)
        return loss * 100, count

    result = _run_loop(_model(tiny_model_dir), 10, loss_fn=exploding, loss_watchdog_threshold=50.0, loss_watchdog_patience=3)
    assert result.stop_reason == "loss_watchdog" and result.steps == 3
    calm = _run_loop(_model(tiny_model_dir), 4, loss_watchdog_threshold=50.0, loss_watchdog_patience=3)
    assert calm.stop_reason is None and calm.steps == 4


def test_fp16_runs_with_a_gradient_scaler_and_an_overflow_skips_only_that_step(tiny_model_dir: Path) -> None:
    """The CPU stands in for CUDA here (torch's GradScaler works on both); the config refuses fp16 without a GPU."""
    model, before = _model(tiny_model_dir), None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    result = _run_loop(model, 2, grad_scaler=scaler, autocast_dtype=torch.float16)
    assert result.skipped_steps == [] and result.steps == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    def overflow(model, batch):  # noqa: ANN001, ANN202
        loss, count = causal_lm_loss(model, batch)
        return loss * 1.0e35, count  # a finite loss whose gradients, scaled by 2**16, overflow

    model = _model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    result = _run_loop(model, 1, loss_fn=overflow, grad_scaler=scaler)  # no NonFiniteError: the scaler skips the step
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and scaler.get_scale() < 2.0 ** 16


def test_fp16_on_a_cpu_run_sets_up_and_tf32_sets_the_cuda_flags(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path)
    cfg.speed.fp16 = True  # fp16 on a CPU runs under float16 CPU autocast (tests/test_keys_axolotl_values.py trains it)
    with TrainingRun(cfg) as run:
        assert run.cfg.speed.fp16
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        set_tf32(was)


def test_bf16_true_on_a_cpu_without_native_bf16_is_warned_and_auto_is_not(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import lmforge.device as device
    import lmforge.recipes.run as training

    for module in (training, device):
        monkeypatch.setattr(module, "cpu_supports_bf16", lambda: False)
    for setting, warned in ((True, True), ("auto", False)):
        cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, bf16=setting)
        with TrainingRun(cfg) as run:
            assert run.bf16 is warned  # auto: fp32 on such a CPU
        err = capsys.readouterr()
        assert ("torch emulates bf16 matmuls" in err.out + err.err) is warned


def test_4bit_compute_dtype_auto_follows_the_run_precision_and_bf16_on_a_slow_cpu_is_warned(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import lmforge.recipes.run as training
    from lmforge.models.setup import _quantization_config

    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    for setting, bf16, expected, warned in (("auto", False, torch.float32, False), ("auto", True, torch.bfloat16, False),
                                            ("bfloat16", False, torch.bfloat16, True)):
        cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter="qlora", load_in_4bit=True,
                   bnb_4bit_compute_dtype=setting, bf16=False)
        assert _quantization_config(cfg, bf16).bnb_4bit_compute_dtype == expected
        with TrainingRun(cfg):
            pass
        err = capsys.readouterr()
        assert ("4-bit matmuls run in emulated bf16" in err.out + err.err) is warned


def test_activation_offloading_moves_nothing_on_cpu(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, activation_offloading=True)
    assert cfg.speed.activation_offloading and "in CPU memory already" in cfg.notices[0].text
    assert TrainingRun(cfg).loop_settings(count_steps(cfg.training, 8)).offload_activations is False


# --- data keys ------------------------------------------------------------------------------------------------------

def test_pad_to_sequence_len_fixes_the_width_and_keeps_the_loss(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir).eval()
    plain, packed = collate(EXAMPLES, 0), collate_packed([EXAMPLES, EXAMPLES[:1]], 0)
    with torch.no_grad():
        for batch in (plain, packed):
            padded = pad_batch(batch, 32, 0)
            assert padded["input_ids"].shape[1] == 32 and int((padded["labels"] != IGNORE_INDEX).sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
            assert float(causal_lm_loss(model, padded)[0]) == pytest.approx(float(causal_lm_loss(model, batch)[0]), rel=1e-5)
    pos = pad_batch(packed, 32, 0)["position_ids"][1].tolist()  # the added padding continues the row's padding block
    assert pos[:8] == list(range(8)) and pos[8:] == list(range(32 - 8))


def test_skip_prepare_dataset_neither_reads_nor_writes_the_cache(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    cached = _cfg(tiny_model_dir, alpaca_file, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"))
    assert "saved to" in prepare(cached.data, tok, 0).stats.note and any((tmp_path / "prepared").iterdir())
    shutil.rmtree(tmp_path / "prepared")
    skipped = _cfg(tiny_model_dir, alpaca_file, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"), skip_prepare_dataset=True)
    data = prepare(skipped.data, tok, 0)
    assert "skip_prepare_dataset" in data.stats.note and not (tmp_path / "prepared").exists() and len(data.train) == 20


# --- saving, evaluating and logging keys -----------------------------------------------------------------------------

def test_save_and_eval_strategies_set_the_cadence(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    def plan(**extra):  # noqa: ANN003, ANN202
        return count_steps(_cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=None, num_epochs=2, **extra).training, 40)

    assert (plan().save_every, plan().eval_every) == (None, None)
    epoch = plan(save_strategy="epoch", eval_strategy="epoch")
    assert epoch.steps_per_epoch == 10 and (epoch.save_every, epoch.eval_every) == (10, 10)
    steps = plan(save_strategy="steps", save_steps=3, eval_steps=4)
    assert (steps.save_every, steps.eval_every) == (3, 4)
    assert (plan(save_strategy="no", eval_strategy="no").save_every, plan(eval_strategy="no").eval_every) == (None, None)
    with pytest.raises(LmforgeError, match="save_strategy: no contradicts save_steps"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, save_strategy="no", save_steps=3)


def test_save_strategy_no_and_no_tensorboard_leave_only_the_output(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=2, save_strategy="no", eval_strategy="no", val_set_size=4,
               use_tensorboard=False, pad_to_sequence_len=True)
    summary = run_train(cfg)
    out = tmp_path / "out"
    assert summary["steps"] == 2 and summary["eval_loss_start"] is None and summary["last_eval_loss"] is None
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("events.out.tfevents*"))
    assert (out / "adapter_model.safetensors").is_file()


def test_save_only_model_checkpoints_hold_weights_only_and_refuse_to_resume(tiny_model_dir: Path, alpaca_file: Path,
                                                                          tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=2, save_steps=1, save_only_model=True)
    run_train(cfg)
    first = tmp_path / "out" / "checkpoint-1"
    assert (first / "adapter_model.safetensors").is_file() and not (first / "optimizer.pt").exists()
    assert list((tmp_path / "out").glob("events.out.tfevents*"))  # TensorBoard stays on by default
    resumed = _cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=3, save_steps=1, resume_from_checkpoint=str(first))
    with pytest.raises(LmforgeError, match="saved with save_only_model: it holds no optimizer"):
        run_train(resumed)


def test_wandb_watch_and_log_model_reach_wandb(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class Run:
        id = "run1"

        def watch(self, model, log):  # noqa: ANN001, ANN202
            calls.append(("watch", log))

        def log(self, metrics, step):  # noqa: ANN001, ANN202
            pass

        def log_artifact(self, artifact):  # noqa: ANN001, ANN202
            calls.append(("artifact", artifact.name, sorted(p.name for p in Path(artifact.folder).iterdir())))

        def finish(self) -> None:
            calls.append(("finish",))

    class Artifact:
        def __init__(self, name: str, type: str) -> None:  # noqa: A002
            self.name = name

        def add_dir(self, folder: str) -> None:
            self.folder = folder

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Artifact=Artifact)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=2, wandb_project="p", wandb_watch="gradients",
               wandb_log_model="end", use_tensorboard=False)
    assert build_loggers(cfg.logging, str(tmp_path), {}, model=None)[0].__class__.__name__ == "WandbLogger"
    calls.clear()
    run_train(cfg)
    assert calls[0] == ("watch", "gradients") and calls[-1] == ("finish",)
    artifact = calls[-2]
    assert artifact[0] == "artifact" and artifact[1] == "run1-model" and "adapter_model.safetensors" in artifact[2]


# --- vocabulary, LoRA on parameters, optimizer names, cross-key checks ------------------------------------------------

def test_tokens_join_the_vocabulary_and_embeddings_pad_to_32x(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.models.load import config_tokenizer

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, tokens=["<|tool|>", "zebra"], resize_token_embeddings_to_32x=True,
               adapter=None, lora_r=None, lora_alpha=None, lora_target_linear=None)
    tok = config_tokenizer(cfg)
    plain = load_tokenizer(str(tiny_model_dir))
    assert len(tok) == len(plain) + 2 and len(tok("zebra <|tool|>").input_ids) == 2
    model = training_model(cfg, tok, CPU, bf16=False)
    rows = model.get_input_embeddings().num_embeddings
    assert rows % 32 == 0 and len(tok) <= rows < len(tok) + 32 and model.get_output_embeddings().out_features == rows


def test_lora_target_parameters_adapt_parameters_by_name(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, lora_target_linear=None, lora_target_modules=[],
               lora_target_parameters=["mlp.down_proj.weight"])
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("down_proj" in name and "lora_" in name for name in trainable), trainable
    assert len(trainable) == 2 * model.get_base_model().config.num_hidden_layers


def test_torchao_optimizer_names_run_as_themselves(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    # torchao's 8-bit and 4-bit AdamW run as themselves (tests/test_keys_long_tail.py steps and resumes them)
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, optimizer="adamw_torch_8bit")
    assert cfg.training.optimizer == "adamw_torch_8bit" and not cfg.notices
    assert _cfg(tiny_model_dir, alpaca_file, tmp_path, optimizer="adamw_torch_4bit").training.optimizer == "adamw_torch_4bit"


def test_precision_and_satellite_keys_are_checked_across_keys(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="fp16 and bf16 are both on"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, fp16=True, bf16=True)
    assert _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, fp16=True, bf16="auto").speed.fp16
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, gradient_checkpointing_kwargs={"use_reentrant": True},
               loss_watchdog_patience=5)
    assert any("gradient_checkpointing_kwargs has no effect" in w for w in cfg.warnings)
    assert any("loss_watchdog_patience has no effect" in w for w in cfg.warnings)
