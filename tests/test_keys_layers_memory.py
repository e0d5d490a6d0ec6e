"""Issue 26's layer and memory keys (tiled_mlp, LISA, peft's LoftQ), each shown to change what lmforge does: a test
here fails if its key is ignored.

Tiny random Llamas; seconds each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama, build_tiny_tokenizer, tiny_config, tiny_llama_config, write_config
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.models.load import load_tokenizer
from lmforge.models.setup import training_model
from lmforge.models.tiled_mlp import decoder_mlps, untiled
from lmforge.recipes.finetune import run_train

CPU = torch.device("cpu")


def _cfg(model_dir: Path, data: Path, tmp_path: Path, gpu: bool = False, **extra: object):  # noqa: ANN202
    tmp_path.mkdir(exist_ok=True)
    path = write_config(tmp_path / "config.yml", tiny_config(model_dir, data, tmp_path / "out", **extra))
    return load_config(str(path), gpu=gpu)


# --- tiled_mlp ------------------------------------------------------------------------------------------------------

def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients_over_slices(adapter: str | None, tiny_model_dir: Path,
                                                                     alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=adapter, tiled_mlp=True, tiled_mlp_num_shards=4)
    said: list[str] = []
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False, say=said.append)
    assert "tiled_mlp: 2 MLPs run over 4 slices of each sequence" in said
    mlps = decoder_mlps(model)
    rows: list[int] = []  # rows each down_proj call sees: a slice of the sequence, not all of it
    mlps[0][1].down_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[-2]))
    ids = torch.randint(4, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    tiled_loss, tiled_grads = _loss_and_grads(model, ids)
    assert rows == [6] * 8, "4 slices of 24 positions in forward, recomputed in backward"
    rows.clear()
    with untiled(model):
        loss, grads = _loss_and_grads(model, ids)
    assert rows == [24]
    assert torch.allclose(tiled_loss, loss, rtol=1e-6, atol=1e-6)
    assert tiled_grads.keys() == grads.keys() and grads
    for name in grads:
        assert torch.allclose(tiled_grads[name], grads[name], rtol=1e-5, atol=1e-6), name
    # The weights keep their names: checkpoints, LoRA targets and saved files are unchanged.
    assert all(".forward" not in n for n in dict(model.named_parameters()))


def test_tiled_mlp_backward_recomputes_with_the_forwards_dropout_masks(tiny_model_dir: Path, alpaca_file: Path,
                                                                       tmp_path: Path) -> None:
    """LoRA dropout inside the MLP: each slice recomputed in backward drops the same units the forward dropped, so the
    gradient is that of the loss the forward computed."""
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, tiled_mlp=True, tiled_mlp_num_shards=3, lora_dropout=0.5)
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False)
    dropped: list[torch.Tensor] = []
    dropout = model.get_submodule("base_model.model.model.layers.1.mlp.down_proj").lora_dropout["default"]
    dropout.register_forward_hook(lambda module, args, out: dropped.append(out == 0))
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(dropped) == 6, "3 slices in forward, 3 recomputed in backward"
    assert all(torch.equal(dropped[i], dropped[i + 3]) for i in range(3))
    assert 0.3 < float(torch.cat(dropped).float().mean()) < 0.7 and not torch.equal(dropped[0], dropped[1])


def test_tiled_mlp_is_refused_with_deepspeed_and_for_a_mixture_of_experts(tiny_model_dir: Path, alpaca_file: Path,
                                                                                tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="tiled_mlp with deepspeed"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, tiled_mlp=True, deepspeed="deepspeed_configs/zero2.json")
    from lmforge.models.tiled_mlp import tile_mlps
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_experts=4, num_experts_per_tok=2, head_dim=8))
    with pytest.raises(LmforgeError, match="mixture-of-experts"):
        tile_mlps(moe, 2)


@pytest.mark.slow  # one torchrun launch of 2 ranks (about 40 s on 2 cores); CI's full suite runs it
def test_tiled_mlp_under_fsdp2_on_two_ranks_trains_as_untiled(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """FSDP2 unshards a decoder layer's weights before its backward, so the slices' recomputation sees them whole and
    the per-slice gradients reach the sharded weights once: the tiled run ends where the untiled one does."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    fsdp = {"fsdp_version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    configs = []
    for name, extra in (("plain", {}), ("tiled", {"tiled_mlp": True, "tiled_mlp_num_shards": 3})):
        configs.append(str(write_config(tmp_path / f"{name}.yml", tiny_config(
            tiny_model_dir, alpaca_file, tmp_path / name, adapter=None, max_steps=3, micro_batch_size=2,
            learning_rate=0.002, fsdp_config=fsdp, seed=7, group_by_length=False, **extra))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "distributed_runs.py"), *configs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "tiled_mlp: 2 MLPs run over 3 slices" in done.stdout
    losses = [json.loads((tmp_path / name / "summary.json").read_text())["final_train_loss"] for name in ("plain", "tiled")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    plain, tiled = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "tiled"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(plain[n], base[n]) for n in plain), "the run trained"
    for name in plain:
        torch.testing.assert_close(tiled[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


# --- LISA -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama-4-layers")
    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_llama(folder, len(tokenizer), num_hidden_layers=4)
    return folder


def _lisa_config(model_dir: Path, data: Path, out: Path, **extra: object) -> dict:
    return tiny_config(model_dir, data, out, adapter=None, learning_rate=1e-3, optimizer="adamw_torch", weight_decay=0.1,
                       max_steps=6, save_steps=1, lisa_n_layers=2, lisa_step_interval=3, group_by_length=False, **extra)


def _changed_layers(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[int]:
    return {int(n.split(".")[2]) for n in before if n.startswith("model.layers.") and not torch.equal(before[n], after[n])}


def test_lisa_trains_n_layers_at_a_time_redrawn_every_interval_and_resumes_bit_identically(
        four_layer_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", _lisa_config(four_layer_dir, alpaca_file, out))
    summary = run_train(load_config(str(config)))
    assert summary["trainable_parameters"] == summary["total_parameters"], "after training every layer trains again"
    weights = [load_file(str(four_layer_dir / "model.safetensors"))]
    weights += [load_file(str(out / f"checkpoint-{step}" / "model.safetensors")) for step in range(1, 7)]
    changed = [_changed_layers(weights[i], weights[i + 1]) for i in range(6)]
    assert all(len(layers) == 2 for layers in changed), changed  # exactly lisa_n_layers layers change at each step
    assert changed[0] == changed[1] == changed[2] and changed[3] == changed[4] == changed[5], changed
    assert changed[0] != changed[3], "a new draw after lisa_step_interval steps (seed 42 draws two different pairs)"
    for step in range(6):  # embeddings and the head train at every step
        assert not torch.equal(weights[step]["model.embed_tokens.weight"], weights[step + 1]["model.embed_tokens.weight"])
        assert not torch.equal(weights[step]["lm_head.weight"], weights[step + 1]["lm_head.weight"])

    # Resumed mid-interval (step 4 of the draw for steps 3-5), the run trains the same layers, bit for bit.
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-4", resumed_out / "checkpoint-4")
    resumed = write_config(tmp_path / "r.yml", _lisa_config(four_layer_dir, alpaca_file, resumed_out))
    run_train(load_config(str(resumed), ["--resume_from_checkpoint=auto"]))
    final, again = load_file(str(out / "model.safetensors")), load_file(str(resumed_out / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[n], again[n]) for n in final)


def test_lisa_without_its_interval_or_beside_best_weights_is_refused(four_layer_dir: Path, alpaca_file: Path,
                                                                      tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="both lisa_n_layers and lisa_step_interval"):
        _cfg(four_layer_dir, alpaca_file, tmp_path, lisa_n_layers=2)
    with pytest.raises(LmforgeError, match="load_best_model_at_end"):
        _cfg(four_layer_dir, alpaca_file, tmp_path, lisa_n_layers=2, lisa_step_interval=3, load_best_model_at_end=True)


def test_lisa_layers_attribute_names_the_layer_list(four_layer_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.train.lisa import LayerSampler

    cfg = _cfg(four_layer_dir, alpaca_file, tmp_path, adapter=None)
    model = training_model(cfg, load_tokenizer(str(four_layer_dir)), CPU, bf16=False)
    sampler = LayerSampler(model, 1, 5, "model.layers", seed=0)
    sampler.at_step(0)
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in model.model.layers]
    assert trains.count(True) == 1 and trains.index(True) == sampler.active[0]
    with pytest.raises(LmforgeError, match="lisa_layers_attribute: model.decoder is not a list of layers"):
        LayerSampler(model, 1, 5, "model.decoder", seed=0)


# --- peft: LoftQ ----------------------------------------------------------------------------------------------------

def test_peft_loftq_config_starts_the_adapter_from_the_quantization_residual(wide_model_dir: Path, alpaca_file: Path,
                                                                            tmp_path: Path) -> None:
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(wide_model_dir))
    original = load_file(str(wide_model_dir / "model.safetensors"))
    settings = dict(lora_r=8, lora_alpha=8, lora_target_modules=["q_proj", "down_proj"], lora_target_linear=False)
    plain = training_model(_cfg(wide_model_dir, alpaca_file, tmp_path, **settings), tokenizer, CPU, bf16=False)
    cfg = _cfg(wide_model_dir, alpaca_file, tmp_path, peft={"loftq_config": {"loftq_bits": 4}}, **settings)
    model = training_model(cfg, tokenizer, CPU, bf16=False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer, default = model.get_submodule(f"base_model.model.{name}"), plain.get_submodule(f"base_model.model.{name}")
        assert torch.count_nonzero(default.lora_B["default"].weight) == 0, "PEFT's default starts B at zero"
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert torch.count_nonzero(b) > 0, "LoftQ starts B from the residual, not at zero"
        weight = original[f"{name}.weight"]
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=False)
        nf4 = bnb.functional.dequantize_4bit(packed, state)
        base = layer.get_base_layer().weight
        assert torch.equal(base, nf4), "the base weight becomes its nf4 value, as in PEFT's LoftQ"
        # LoftQ's point: base + B·A is nearer the full-precision weight than the quantized base alone.
        assert (weight - (base + b @ a)).norm() < 0.9 * (weight - base).norm()


def test_peft_loftq_config_is_refused_with_a_quantized_base_or_without_lora(wide_model_dir: Path, alpaca_file: Path,
                                                                           tmp_path: Path) -> None:
    loftq = {"loftq_config": {"loftq_bits": 4}}
    with pytest.raises(LmforgeError, match="load_in_4bit: false"):
        _cfg(wide_model_dir, alpaca_file, tmp_path, adapter="qlora", load_in_4bit=True, peft=loftq)
    with pytest.raises(LmforgeError, match="adapter: lora"):
        _cfg(wide_model_dir, alpaca_file, tmp_path, adapter=None, peft=loftq)
    with pytest.raises(LmforgeError, match="peft.init_lora_weights"):
        _cfg(wide_model_dir, alpaca_file, tmp_path, peft={"init_lora_weights": "pissa"})


# --- hub_model_id, streaming --------------------------------------------------------------------------------------

class _FakeHub:
    """huggingface_hub.HfApi's calls lmforge makes, recorded (no network here)."""

    calls: list[tuple[str, dict]] = []
    fail: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: object) -> str:
        if self.fail is not None:
            raise self.fail
        folder = Path(str(kwargs["folder_path"]))
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"


def test_hub_model_id_pushes_the_finished_output_without_checkpoints(tiny_model_dir: Path, alpaca_file: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    _FakeHub.calls, _FakeHub.fail = [], None
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, max_steps=2, save_steps=1, hub_model_id="someone/tiny-lora",
               hub_revision="run-1")
    run_train(cfg)
    names = [name for name, _ in _FakeHub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    upload = _FakeHub.calls[-1][1]
    assert upload["repo_id"] == "someone/tiny-lora" and upload["revision"] == "run-1"
    assert upload["folder_path"] == str(tmp_path / "out")
    assert {"adapter_model.safetensors", "summary.json"} <= set(upload["files"])  # pushed after the summary is written
    assert "checkpoint-*" in upload["ignore_patterns"] and "checkpoint-1" in upload["files"]  # on disk, not pushed

    _FakeHub.fail = ConnectionError("no network")
    with pytest.raises(LmforgeError, match="pushing .* to the Hub repo someone/tiny-lora failed") as err:
        run_train(_cfg(tiny_model_dir, alpaca_file, tmp_path / "again", max_steps=1, hub_model_id="someone/tiny-lora"))
    assert "hf upload someone/tiny-lora" in err.value.fix
    assert (tmp_path / "again" / "out" / "adapter_model.safetensors").is_file(), "the output stays when a push fails"


def test_hub_model_id_placeholder_and_pushing_during_the_run_are_refused_at_validate(tiny_model_dir: Path,
                                                                                    alpaca_file: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="'<your-hub-model-id>' is not a Hub repo id"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, hub_model_id="<your-hub-model-id>")
    with pytest.raises(LmforgeError, match="hub_strategy: every_save"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, hub_model_id="a/b", hub_strategy="every_save")


def test_streaming_fine_tuning_datasets_is_a_notice_saying_how_lmforge_reads_them(tiny_model_dir: Path,
                                                                                  alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, streaming=True)
    notice = next(n for n in cfg.notices if n.key == "streaming")
    assert "prepared-data cache" in str(notice)


def test_lisa_n_layers_not_below_the_layer_count_trains_every_layer_with_a_warning(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """axolotl's lisa.yml asks for 4 layers; a 2-layer model of the family trains all of them, and says so."""
    out = tmp_path / "out"
    run_train(load_config(str(write_config(tmp_path / "c.yml", {**_lisa_config(tiny_model_dir, alpaca_file, out),
                                                                 "lisa_n_layers": 4, "max_steps": 1, "save_steps": None}))))
    assert "lisa_n_layers: 4 is not fewer than the model's 2 layers: every layer trains" in capsys.readouterr().out
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert _changed_layers(before, after) == {0, 1}


# --- dp_replicate_size (HSDP) ---------------------------------------------------------------------------------------

def test_dp_replicate_size_sizes_must_multiply_to_the_ranks_and_need_fsdp(tiny_model_dir: Path, alpaca_file: Path,
                                                                         tmp_path: Path) -> None:
    from lmforge.train.distributed import check_shard_size

    check_shard_size(2, 4, 2)  # 2 groups × 2 shards = the 4 ranks
    check_shard_size(None, 4, 2)  # the shard size follows from the ranks
    with pytest.raises(LmforgeError, match="dp_replicate_size: 2 groups × dp_shard_size: 2 is 4 ranks and this run has 2"):
        check_shard_size(2, 2, 2)
    with pytest.raises(LmforgeError, match="replicates FSDP's sharded groups"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, dp_replicate_size=2)
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, dp_replicate_size=1)  # axolotl's falcon-e configs: asks for nothing
    assert cfg.distributed.dp_replicate_size == 1 and not cfg.notices


@pytest.mark.slow  # one torchrun launch of 4 ranks (about a minute on 2 cores); CI's full suite runs it
def test_hsdp_on_four_gloo_ranks_as_two_by_two_trains_as_one_process(tiny_model_dir: Path, alpaca_file: Path,
                                                                     tmp_path: Path) -> None:
    """dp_replicate_size: 2 × dp_shard_size: 2 on 4 ranks: each pair shards the weights, the pairs replicate them; the
    per-step losses and final weights are those of one process with the same global batch."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    settings = dict(adapter=None, micro_batch_size=2, max_steps=4, learning_rate=0.002, lr_scheduler="cosine",
                    warmup_steps=1, logging_steps=1, seed=7, group_by_length=False)
    reference = tmp_path / "one"
    run_train(load_config(str(write_config(tmp_path / "one.yml", tiny_config(
        tiny_model_dir, alpaca_file, reference, gradient_accumulation_steps=4, **settings)))))
    hsdp = tmp_path / "hsdp"
    config = write_config(tmp_path / "hsdp.yml", tiny_config(
        tiny_model_dir, alpaca_file, hsdp, gradient_accumulation_steps=1, dp_replicate_size=2, dp_shard_size=2,
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                     "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}, **settings))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           str(REPO / "tests" / "distributed_runs.py"), str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "replicated in 2 groups (HSDP)" in done.stdout
    history = [json.loads((d / "summary.json").read_text()) for d in (hsdp, reference)]
    assert history[0]["ranks"] == 4 and history[0]["final_train_loss"] == pytest.approx(history[1]["final_train_loss"], abs=1e-4)
    ours, ref = load_file(str(hsdp / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-4, rtol=1e-3, msg=name)


# --- cls_model_config -------------------------------------------------------------------------------------------------

def test_cls_model_config_reads_the_config_with_that_class_and_loads_its_architecture(tiny_model_dir: Path,
                                                                                      alpaca_file: Path, tmp_path: Path) -> None:
    """A Llama checkpoint read with MistralConfig loads as a Mistral model (the same weight names); an unknown class
    is one line at load time, a malformed name one line at validate."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path, cls_model_config="MistralConfig"), tokenizer,
                           CPU, bf16=False)
    assert type(model.get_base_model()).__name__ == "MistralForCausalLM"
    plain = training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path), tokenizer, CPU, bf16=False)
    assert type(plain.get_base_model()).__name__ == "LlamaForCausalLM"
    with pytest.raises(LmforgeError, match="has no class NoSuchConfig"):
        training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path, cls_model_config="NoSuchConfig"), tokenizer, CPU,
                       bf16=False)
    with pytest.raises(LmforgeError, match="cls_model_config"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, cls_model_config="gemma3")


def test_peft_loftq_config_on_cuda_is_pefts_own_loftq_init(wide_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA runs, PEFT initialises LoftQ itself (init_lora_weights="loftq"): its loftq_init is called per adapted
    layer with the configured bits (replaced here by a recorder, as PEFT's computes on CUDA)."""
    import peft.tuners.lora.layer as lora_layer

    from lmforge.models.adapters import apply_lora
    from lmforge.models.load import load_model

    calls: list[dict] = []

    def recorder(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):  # noqa: ANN202
        calls.append({"bits": num_bits, "rank": reduced_rank, "iterations": num_iter})
        return weight, torch.ones(reduced_rank, weight.shape[1]), torch.ones(weight.shape[0], reduced_rank)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lora_layer, "loftq_init", recorder)
    cfg = _cfg(wide_model_dir, alpaca_file, tmp_path, lora_r=8, lora_target_modules=["q_proj"], lora_target_linear=False,
               peft={"loftq_config": {"loftq_bits": 8, "loftq_iter": 2}})
    model = apply_lora(load_model(str(wide_model_dir)), cfg.adapter)
    assert calls == [{"bits": 8, "rank": 8, "iterations": 2}] * 2  # q_proj of both layers
    assert model.peft_config["default"].init_lora_weights == "loftq"
