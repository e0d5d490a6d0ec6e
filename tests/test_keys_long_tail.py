"""Issue 26's long tail of axolotl keys (optimizers, model loading, memory, values, QAT), each shown to change what
lmforge does: a test here fails if its key is ignored.

Tiny random Llama models; seconds each (adamw_torch_4bit compiles its step once per parameter shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_tiny_tokenizer, random_examples, tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.errors import LmforgeError
from lmforge.models.load import load_model, load_tokenizer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.optimizers import MuonWithAdamW, build_optimizer
from lmforge.train.schedules import build_scheduler

CPU = torch.device("cpu")


def _cfg(model_dir: Path, data: Path, tmp_path: Path, gpu: bool = False, **extra: object):  # noqa: ANN202
    path = write_config(tmp_path / "config.yml", tiny_config(model_dir, data, tmp_path / "out", **extra))
    return load_config(str(path), gpu=gpu)


# --- optimizers ---------------------------------------------------------------------------------------------------

def _optimizer_for(cfg, model):  # noqa: ANN001, ANN202
    t = cfg.training
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, 0.01, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    return optimizer, build_scheduler(optimizer, "cosine", 4, 1)


def _steps(model, optimizer, scheduler, batches) -> None:  # noqa: ANN001
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw_torch_4bit", "adamw_torch_8bit", "muon", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"])
def test_axolotl_optimizers_step_and_resume_bit_identically(name: str, wide_model_dir: Path, alpaca_file: Path,
                                                            tmp_path: Path) -> None:
    cfg = _cfg(wide_model_dir, alpaca_file, tmp_path, adapter=None, optimizer=name, learning_rate=1e-3)
    tokenizer = load_tokenizer(str(wide_model_dir))
    batches = [collate(random_examples(4, len(tokenizer), seed=s), 0) for s in range(4)]

    straight = load_model(str(wide_model_dir))
    optimizer, scheduler = _optimizer_for(cfg, straight)
    before = [p.detach().clone() for p in straight.parameters()]
    _steps(straight, optimizer, scheduler, batches)
    assert all(not torch.equal(a, b) for a, b in zip(before, straight.parameters()))  # every weight stepped

    # What the key chose, so that ignoring it (plain adamw_torch) fails here.
    mlp = straight.model.layers[0].mlp.up_proj.weight
    if name == "adamw_torch_4bit":
        from torchao.optim.subclass_4bit import OptimState4bit

        assert isinstance(optimizer.state[mlp]["exp_avg"], OptimState4bit)
        assert not isinstance(optimizer.state[straight.model.norm.weight]["exp_avg"], OptimState4bit)  # too small: fp32
    elif name == "adamw_torch_8bit":  # torchao's, not bitsandbytes' (which has no DTensor step for FSDP2)
        from torchao.optim.subclass_8bit import OptimState8bit

        assert isinstance(optimizer.state[mlp]["exp_avg"], OptimState8bit)
    elif name == "muon":
        assert isinstance(optimizer, MuonWithAdamW)
        assert "momentum_buffer" in optimizer.muon.state[mlp]  # hidden matrices: Muon
        assert "exp_avg" in optimizer.adamw.state[straight.model.embed_tokens.weight]  # embeddings, head, norms: AdamW
        assert straight.lm_head.weight in optimizer.adamw.state
    else:
        import bitsandbytes as bnb

        expected = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
                    "adamw_8bit": bnb.optim.AdamW8bit}[name]
        assert type(optimizer) is expected

    # Two steps, a checkpoint through checkpoint.py, a fresh model and optimizer resumed from it, two more steps.
    first = load_model(str(wide_model_dir))
    optimizer, scheduler = _optimizer_for(cfg, first)
    _steps(first, optimizer, scheduler, batches[:2])
    folder = save_checkpoint(tmp_path / "checkpoint-2", model=first, tokenizer=tokenizer, config={}, optimizer=optimizer,
                             scheduler=scheduler, state={"global_step": 2})
    resumed = load_model(str(wide_model_dir))
    optimizer, scheduler = _optimizer_for(cfg, resumed)
    load_checkpoint(folder, resumed, optimizer, scheduler)
    _steps(resumed, optimizer, scheduler, batches[2:])
    for (key, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), key


def test_paged_optimizers_say_they_run_unpaged_without_a_gpu(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, optimizer="paged_adamw_32bit")
    assert cfg.training.optimizer == "paged_adamw_32bit"
    assert [n.key for n in cfg.notices] == ["optimizer"] and "unpaged" in cfg.notices[0].text
    assert _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, optimizer="paged_adamw_32bit").notices == []


# --- values axolotl accepts -----------------------------------------------------------------------------------------

def test_unfrozen_parameters_with_an_adapter_train_fully_beside_it_and_are_saved_with_it(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lmforge.recipes.finetune import run_train

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, max_steps=3, lora_target_linear=False, lora_target_modules=["q_proj", "v_proj"],
                      unfrozen_parameters=["lm_head", r"model\.layers\.1\.mlp\.down", r"model\.layers\.0\.self_attn\.q_proj"])
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    base, adapter = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    full = {k.removeprefix("base_model.model."): v for k, v in adapter.items() if "lora_" not in k}
    # lm_head and the one MLP projection train fully (saved whole, changed); q_proj, adapted, trains through LoRA
    assert set(full) == {"lm_head.weight", "model.layers.1.mlp.down_proj.weight"}
    assert all(not torch.equal(full[k], base[k]) for k in full)
    assert any("layers.0.self_attn.q_proj.lora_A" in k for k in adapter)
    lora = sum(v.numel() for k, v in adapter.items() if "lora_" in k)
    assert summary["trainable_parameters"] == lora + sum(v.numel() for v in full.values())


def test_warmup_steps_below_one_is_a_share_of_all_steps(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.recipes.run import count_steps

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, warmup_steps=0.1, max_steps=30)
    assert (cfg.training.warmup_steps, cfg.training.warmup_ratio) == (None, 0.1)
    assert count_steps(cfg.training, 80).warmup_steps == 3  # 10% of the 30 steps, not int(0.1) == 0 steps
    with pytest.raises(LmforgeError, match="keep one"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, warmup_steps=0.1, warmup_ratio=0.2)


def test_tokens_as_a_mapping_sets_the_special_tokens(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.models.load import config_tokenizer

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, tokens={"bos_token": "<s>", "eos_token": "<|end|>"})
    assert cfg.model.special_tokens == {"bos_token": "<s>", "eos_token": "<|end|>"} and cfg.model.tokens is None
    tokenizer = config_tokenizer(cfg)
    assert tokenizer.eos_token == "<|end|>" and tokenizer.convert_tokens_to_ids("<|end|>") == len(tokenizer) - 1
    with pytest.raises(LmforgeError, match="tokens.end_token"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, tokens={"end_token": "<|end|>"})


def test_model_config_beside_base_model_overrides_the_base_config(tiny_model_dir: Path, alpaca_file: Path,
                                                                  tmp_path: Path) -> None:
    from lmforge.models.setup import training_model

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, model_config={"rms_norm_eps": 0.25, "attention_dropout": 0.5})
    assert cfg.model.overrides_of_model_config == {"rms_norm_eps": 0.25, "attention_dropout": 0.5}
    assert cfg.pretrain.model_config_ is None and not cfg.is_pretraining
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False).get_base_model()
    assert model.config.rms_norm_eps == 0.25 and model.model.norm.variance_epsilon == 0.25  # the live modules too
    assert model.model.layers[0].self_attn.attention_dropout == 0.5
    typo = _cfg(tiny_model_dir, alpaca_file, tmp_path, model_config={"rms_norm_epsilon": 0.25})
    with pytest.raises(LmforgeError, match="no field 'rms_norm_epsilon'") as err:
        training_model(typo, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False)
    assert err.value.fix == "did you mean rms_norm_eps?"


# --- distributed and memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, stage, offload", [("zero3_bf16", 3, set()), ("zero3_bf16_cpuoffload_all", 3, {"offload_param", "offload_optimizer"}),
                                                   ("zero3_bf16_cpuoffload_params", 3, {"offload_param"}), ("zero2", 2, set())])
def test_deepspeed_files_named_as_in_axolotl_are_the_shipped_ones(name: str, stage: int, offload: set, tiny_model_dir: Path,
                                                                   alpaca_file: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config.checks import deepspeed_json

    monkeypatch.chdir(tmp_path)  # a user's folder, without axolotl's deepspeed_configs/
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, deepspeed=f"deepspeed_configs/{name}.json")
    zero = deepspeed_json(cfg.distributed.deepspeed)["zero_optimization"]
    assert zero["stage"] == stage and {k for k in zero if k.startswith("offload_")} == offload
    with pytest.raises(LmforgeError, match="does not exist"):
        deepspeed_json("deepspeed_configs/zero4.json")


def test_gradient_checkpointing_offload_checkpoints_and_offloads_on_cuda(tiny_model_dir: Path, alpaca_file: Path,
                                                                          tmp_path: Path) -> None:
    from lmforge.models.setup import training_model
    from lmforge.recipes.run import TrainingRun, count_steps

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, gradient_checkpointing="offload")
    assert cfg.training.gradient_checkpointing == "offload" and "in CPU memory" in cfg.notices[0].text
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False)
    assert model.get_base_model().is_gradient_checkpointing
    run = TrainingRun(cfg)
    assert run.loop_settings(count_steps(cfg.training, 8)).offload_activations is False  # CPU: nothing to move
    run.device = torch.device("cuda")  # what the loop is told on a GPU (test_gpu_paths checks the hooks move activations)
    assert run.loop_settings(count_steps(cfg.training, 8)).offload_activations is True
    assert _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, gradient_checkpointing="offload").notices == []
    with pytest.raises(LmforgeError, match="offload_disk"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, gradient_checkpointing="offload_disk")


# --- quantization-aware training ------------------------------------------------------------------------------------

QAT = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32}


def test_qat_fake_quantised_forward_is_torchaos_and_differs_from_the_plain_one(tiny_model_dir: Path, alpaca_file: Path,
                                                                              tmp_path: Path) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig, IntxFakeQuantizeConfig

    from lmforge.models.setup import training_model

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, qat=QAT)
    ours = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False).eval()
    # torchao's reference: the same model fake-quantised by hand, as axolotl's prepare_model_for_qat sets it up
    reference = load_model(str(tiny_model_dir)).eval()
    quantize_(reference, QATConfig(weight_config=Int4WeightFakeQuantizeConfig(group_size=32, activation_dtype=torch.bfloat16),
                                   activation_config=IntxFakeQuantizeConfig(dtype=torch.int8, granularity="per_token",
                                                                            is_symmetric=False)))
    plain = load_model(str(tiny_model_dir)).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2]])
    with torch.no_grad():
        got, want, unquantized = (m(input_ids=ids).logits for m in (ours, reference, plain))
    assert torch.equal(got, want)
    assert not torch.allclose(got, unquantized, atol=1e-4)
    # the weights the forward uses hold at most 16 levels per group of 32 (int4)
    layer = ours.model.layers[0].mlp.up_proj
    groups = layer.weight_fake_quantizer(layer.weight.detach()).reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in groups) <= 16 < len(torch.unique(layer.weight.detach().reshape(-1, 32)[0]))


def test_qat_trains_then_saves_a_plain_model_that_loads(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmforge.recipes.finetune import run_train

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, adapter=None, max_steps=2, learning_rate=1e-3,
                      qat={**QAT, "fake_quant_after_n_steps": 1})
    run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    base, saved = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(saved) == set(base) and any(not torch.equal(saved[k], base[k]) for k in base)  # trained, same names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # converted: no fake-quantised layers left
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()


def test_qat_fake_quant_after_n_steps_starts_it_late(tiny_model_dir: Path) -> None:
    from lmforge.config.sections import QatSpec
    from lmforge.models.qat import delay_fake_quant, prepare_qat

    model = prepare_qat(load_model(str(tiny_model_dir)), QatSpec(**QAT))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    delay_fake_quant(model, optimizer, after_steps=2, steps_done=0)
    layer = model.model.layers[0].mlp.up_proj
    seen = []
    for _ in range(3):
        seen.append(layer.weight_fake_quantizer.enabled)
        optimizer.step()
    assert seen == [False, False, True]
    delay_fake_quant(model, torch.optim.SGD(model.parameters(), lr=0.0), after_steps=2, steps_done=2)  # resumed at step 2
    assert layer.weight_fake_quantizer.enabled


NVFP4 = {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4", "group_size": 16}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _on_nvfp4_levels(values: torch.Tensor) -> bool:
    """Every block of 16 is E2M1 levels times one scale: the block's largest magnitude is 6 x that scale."""
    blocks = values.reshape(-1, 16)
    unit = blocks.abs().amax(dim=1, keepdim=True) / 6
    ratios = (blocks.abs() / unit.clamp_min(1e-30)).unsqueeze(-1)
    return bool(((ratios - E2M1).abs().amin(-1) < 1e-3).all())


def test_qat_nvfp4_off_cuda_rounds_with_torchao_and_passes_the_gradient_straight_through() -> None:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    from lmforge.config.sections import QatSpec
    from lmforge.models.qat import prepare_qat

    torch.manual_seed(0)
    model = prepare_qat(torch.nn.Sequential(torch.nn.Linear(32, 48)), QatSpec(**NVFP4))
    layer = model[0]
    x = torch.randn(2, 3, 32, requires_grad=True)
    out = layer(x)  # torchao's own layer raises here without CUDA (torch._scaled_mm)

    def torchao_rounded(v: torch.Tensor) -> torch.Tensor:
        return NVFP4Tensor.to_nvfp4(v, per_tensor_scale=per_tensor_amax_to_scale(v.abs().max())).dequantize(v.dtype)

    x_q, w_q = torchao_rounded(x.detach().reshape(6, 32)), torchao_rounded(layer.weight.detach())
    assert torch.equal(out.detach().reshape(6, 48), torch.nn.functional.linear(x_q, w_q, layer.bias.detach()))
    assert not torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-3)  # it rounds
    assert _on_nvfp4_levels(w_q) and _on_nvfp4_levels(x_q) and not _on_nvfp4_levels(layer.weight.detach())
    grad = torch.randn_like(out)
    out.backward(grad)
    # torchao's backward: grads through the rounded tensors, as if rounding were the identity
    torch.testing.assert_close(layer.weight.grad, grad.reshape(6, 48).t() @ x_q)
    torch.testing.assert_close(x.grad, (grad.reshape(6, 48) @ w_q).reshape(2, 3, 32))


def test_qat_mxfp4_runs_under_bf16_autocast_as_torchao_runs_it_in_bf16() -> None:
    """axolotl's 3b-qat-mxfp4 example with bf16: true stopped on torchao's dtype assertion (an fp32 input met
    autocast's bf16 matmul). Under autocast the layer now gives torchao's own output for the bf16 input and weight,
    and the fp32 weight gets a gradient."""
    from lmforge.config.sections import QatSpec
    from lmforge.models.qat import prepare_qat

    torch.manual_seed(0)
    layer = prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 32)), QatSpec(weight_dtype="mxfp4",
                                                                               activation_dtype="mxfp4", group_size=32))[0]
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    reference[0].load_state_dict({k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()})
    reference = prepare_qat(reference, QatSpec(weight_dtype="mxfp4", activation_dtype="mxfp4", group_size=32))[0]
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x.to(torch.bfloat16)))
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32 and layer.weight.grad.abs().sum() > 0


def test_qat_nvfp4_changes_the_loss_trains_and_saves_a_plain_model(tiny_model_dir: Path, alpaca_file: Path,
                                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmforge.models.setup import training_model
    from lmforge.recipes.finetune import run_train

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, qat=NVFP4)
    ours = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=False).eval()
    plain = load_model(str(tiny_model_dir)).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2]])
    with torch.no_grad():
        qat_loss, plain_loss = (m(input_ids=ids, labels=ids).loss for m in (ours, plain))
    assert abs(qat_loss.item() - plain_loss.item()) > 1e-4

    out = tmp_path / "out"
    run_train(load_config(str(write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, out, adapter=None,
                                                                            max_steps=2, learning_rate=1e-3, qat=NVFP4)))))
    base, saved = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(saved) == set(base) and any(not torch.equal(saved[k], base[k]) for k in base)  # trained, same names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # converted: no fake-quantised layers left
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()


def test_qat_refusals_name_what_runs(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cpu = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, qat=NVFP4)
    assert cpu.quantization.qat.weight_dtype == "nvfp4" and any("_scaled_mm" in n.text for n in cpu.notices)
    gpu = _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, adapter=None, qat=NVFP4)
    assert gpu.quantization.qat.weight_dtype == "nvfp4" and not any("_scaled_mm" in n.text for n in gpu.notices)
    with pytest.raises(LmforgeError, match="adapter leaves them frozen"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, qat=QAT)
    with pytest.raises(LmforgeError, match="not a format torchao quantizes"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, qat={"weight_dtype": "int8"})


# --- model loading --------------------------------------------------------------------------------------------------

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]  # OCP MX E2M1


def _mxfp4_weight(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The OCP MX format read by hand: per output row, groups of 32 E2M1 values (two per byte, low nibble first)
    times 2**(scale - 127); returned as gpt-oss holds the weight, [experts, in, out]."""
    experts, out_rows, groups, _ = blocks.shape
    values = torch.empty(experts, out_rows, groups, 32)
    for e, o, g in ((e, o, g) for e in range(experts) for o in range(out_rows) for g in range(groups)):
        pairs = [(FP4[b & 15], FP4[b >> 4]) for b in blocks[e, o, g].tolist()]
        values[e, o, g] = torch.tensor([v for pair in pairs for v in pair]) * 2.0 ** (int(scales[e, o, g]) - 127)
    return values.reshape(experts, out_rows, groups * 32).transpose(1, 2)


@pytest.fixture(scope="module")
def mxfp4_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny gpt-oss checkpoint whose experts are stored MXFP4-packed, as openai/gpt-oss-20b's are."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    folder = tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4")
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          layer_types=["full_attention"], max_position_embeddings=128,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0)
    GptOssForCausalLM(config).save_pretrained(folder)
    weights, expected, generator = load_file(str(folder / "model.safetensors")), {}, torch.Generator().manual_seed(1)
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{name}"
        experts, inputs, outputs = weights.pop(key).shape
        blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(120, 130, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=generator)
        weights[key + "_blocks"], weights[key + "_scales"], expected[name] = blocks, scales, _mxfp4_weight(blocks, scales)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "quantization_config": {"quant_method": "mxfp4"}}))
    return folder, expected


def test_model_quantization_config_mxfp4_loads_the_checkpoint_dequantized_to_train(
        mxfp4_model_dir: tuple[Path, dict[str, torch.Tensor]], alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.models.setup import training_model

    folder, expected = mxfp4_model_dir
    cfg = _cfg(folder, alpaca_file, tmp_path, adapter=None, model_quantization_config="Mxfp4Config",
               model_quantization_config_kwargs={"dequantize": True})
    model = training_model(cfg, load_tokenizer(str(folder)), CPU, bf16=False)
    experts = model.model.layers[0].mlp.experts
    for name, weight in expected.items():
        assert torch.equal(getattr(experts, name).detach(), weight), name  # the packed values, read as the format says
    assert experts.gate_up_proj.requires_grad
    model(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0

    with pytest.raises(LmforgeError, match="without dequantizing") as err:
        _cfg(folder, alpaca_file, tmp_path, adapter=None, model_quantization_config="Mxfp4Config")
    assert err.value.fix == "nearest supported: model_quantization_config_kwargs: {dequantize: true}"
    with pytest.raises(LmforgeError, match="FP8 checkpoints"):
        _cfg(folder, alpaca_file, tmp_path, adapter=None, model_quantization_config="FineGrainedFP8Config")


def test_min_sample_len_and_exact_deduplication_drop_examples(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import write_jsonl
    from lmforge.data.prepare import build

    rows = [{"instruction": "what is one plus two ?", "input": "", "output": "three"}] * 3
    rows += [{"instruction": "add", "input": "", "output": "no"}, {"instruction": "name a red bird", "input": "", "output": "cat"}]
    data_file = write_jsonl(tmp_path / "rows.jsonl", rows)
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def examples(**keys: object) -> list:
        cfg = _cfg(tiny_model_dir, data_file, tmp_path, **keys)
        return build(cfg.data, tokenizer, 0).train

    everything = examples()
    shortest = min(len(e) for e in everything)
    assert len(everything) == 5
    assert len(examples(dataset_exact_deduplication=True)) == 3  # the three identical rows are one
    kept = examples(min_sample_len=shortest + 1)
    assert len(kept) == 4 and min(len(e) for e in kept) > shortest


def test_lr_quadratic_warmup_squares_the_warmup(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.recipes.run import TrainingRun, count_steps

    lines = {}
    for quadratic in (False, True):
        cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, warmup_steps=3, max_steps=10, lr_quadratic_warmup=quadratic)
        _, scheduler = TrainingRun(cfg).optimizer(load_model(str(tiny_model_dir)), count_steps(cfg.training, 40))
        lines[quadratic] = [scheduler.lr_lambdas[0](step) for step in range(5)]
    assert lines[False][:3] == [0.25, 0.5, 0.75] and lines[True][:3] == [0.0625, 0.25, 0.5625]
    assert lines[False][3:] == lines[True][3:]  # after the warm-up, the same schedule


def test_lmforge_quantize_writes_torchaos_quantized_model_that_loads(tiny_model_dir: Path, alpaca_file: Path,
                                                                     tmp_path: Path) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main

    path = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", adapter=None, qat=QAT))
    assert main(["quantize", str(path), "--model", str(tiny_model_dir), "--output", str(tmp_path / "q")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(loaded.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    reference = load_model(str(tiny_model_dir))  # torchao applied by hand to the same weights
    quantize_(reference, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    fp8 = write_config(tmp_path / "f.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", adapter=None,
                                                       qat={"weight_dtype": "fp8", "activation_dtype": "fp8"}))
    assert main(["quantize", str(fp8), "--model", str(tiny_model_dir)]) == 2  # one line naming what works


def test_reinit_weights_builds_the_architecture_with_new_weights(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.models.setup import training_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, reinit_weights=True)
    torch.manual_seed(7)
    fresh = training_model(cfg, tokenizer, CPU, bf16=False)
    torch.manual_seed(7)
    again = training_model(cfg, tokenizer, CPU, bf16=False)
    loaded = load_model(str(tiny_model_dir))
    assert fresh.config.hidden_size == loaded.config.hidden_size and type(fresh) is type(loaded)
    pairs = list(zip(fresh.named_parameters(), loaded.parameters(), again.parameters()))
    assert all(torch.equal(a, c) for (_, a), _, c in pairs)  # seeded: the same new weights
    assert all(not torch.equal(a, b) for (name, a), b, _ in pairs if "norm" not in name)  # not the checkpoint's
    with pytest.raises(LmforgeError, match="cannot be loaded quantized"):
        training_model(_cfg(tiny_model_dir, alpaca_file, tmp_path, reinit_weights=True, adapter="qlora", load_in_4bit=True),
                       tokenizer, CPU, bf16=False)


def test_revision_of_model_reaches_the_hub_loads_and_is_a_notice_for_a_folder(tiny_model_dir: Path, alpaca_file: Path,
                                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from lmforge.models.load import config_tokenizer
    from lmforge.models.setup import training_model

    local = _cfg(tiny_model_dir, alpaca_file, tmp_path, revision_of_model="v2")
    assert [n.key for n in local.notices] == ["revision_of_model"] and "no revisions" in local.notices[0].text
    asked: list[tuple[str, str | None]] = []

    def hub(kind: str, real):  # noqa: ANN001, ANN202
        def from_pretrained(source, *args, **kwargs):  # noqa: ANN001, ANN202
            asked.append((kind, kwargs.get("revision")))
            return real(str(tiny_model_dir), *args, **{k: v for k, v in kwargs.items() if k != "revision"})
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub("tokenizer", transformers.AutoTokenizer.from_pretrained))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        hub("model", transformers.AutoModelForCausalLM.from_pretrained))
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, base_model="org/tiny-llama", revision_of_model="v2")
    assert cfg.notices == [] and cfg.model.revision_of_model == "v2"
    training_model(cfg, config_tokenizer(cfg), CPU, bf16=False)
    assert asked == [("tokenizer", "v2"), ("model", "v2")]


# --- trackers -------------------------------------------------------------------------------------------------------

def test_use_otel_metrics_serves_the_metrics_for_prometheus(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from lmforge.train.loggers import OtelLogger, build_loggers

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, use_otel_metrics=True, otel_metrics_host="127.0.0.1", otel_metrics_port=port)
    loggers = build_loggers(cfg.logging, str(tmp_path / "out"), {})
    otel = [logger for logger in loggers if isinstance(logger, OtelLogger)]
    assert len(otel) == 1
    try:
        otel[0].log(3, {"loss": 1.25, "lr": 0.001})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        for logger in loggers:
            logger.close()
    read = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("lmforge_")}
    assert read["lmforge_loss"] == 1.25 and read["lmforge_lr"] == 0.001 and read["lmforge_step"] == 3


def test_swanlab_offline_run_holds_the_metrics_read_back_with_swanlabs_reader(tiny_model_dir: Path, alpaca_file: Path,
                                                                              tmp_path: Path) -> None:
    from swanlab.log.backup.datastore import DataStore
    from swanlab.log.backup.models import ModelsParser

    from lmforge.train.loggers import SwanLabLogger, build_loggers

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, use_swanlab=True, swanlab_project="lmforge-test", swanlab_mode="offline",
               swanlab_experiment_name="tiny", plugins=["axolotl.integrations.swanlab.SwanLabPlugin"])
    loggers = [logger for logger in build_loggers(cfg.logging, str(tmp_path / "out"), {"learning_rate": 0.05}, )
               if isinstance(logger, SwanLabLogger)]
    assert len(loggers) == 1
    for step, loss in ((1, 2.5), (2, 1.5)):
        loggers[0].log(step, {"loss": loss})
    loggers[0].close()
    [backup] = (tmp_path / "out" / "swanlog").glob("run-*/backup.swanlab")
    store = DataStore()
    store.open_for_scan(str(backup))
    with ModelsParser() as parser:
        for record in store:
            if record is not None:
                parser.parse_record(record)
    _, project, experiment, _, _, _, scalars, _, _ = parser.get_parsed()
    assert (project.name, experiment.name) == ("lmforge-test", "tiny")
    assert sorted((s.step, s.metric["data"]) for s in scalars if s.key == "loss") == [(1, 2.5), (2, 1.5)]


def test_gemma4_hybrid_attention_is_a_kernel_choice_with_a_notice(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, gemma4_hybrid_attn_impl=True)
    assert [n.key for n in cfg.notices] == ["gemma4_hybrid_attn_impl"] and "the same math" in cfg.notices[0].text
    assert cfg.model.attn_implementation is None  # nothing changes: the default backend runs every layer
    with pytest.raises(LmforgeError, match="512-wide global heads") as err:
        _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, gemma4_hybrid_attn_impl=True, attn_implementation="flash_attention_2")
    assert "sdpa" in err.value.fix


def test_tokenizer_legacy_changes_how_text_after_a_special_token_is_split(alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import LlamaTokenizer

    from lmforge.models.load import config_tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "▁b": 7}
    folder = tmp_path / "llama-tokenizer"
    LlamaTokenizer(vocab=vocab, merges=[("▁", "a"), ("▁", "b")]).save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    ids = {}
    for legacy in (True, False):
        cfg = _cfg(folder, alpaca_file, tmp_path, tokenizer_legacy=legacy)
        ids[legacy] = config_tokenizer(cfg)("a</s>b", add_special_tokens=False).input_ids
    assert ids == {True: [6, 2, 7], False: [6, 2, 5]}  # legacy puts "▁" before the b that follows </s>


def test_bfloat16_beside_bf16_and_an_adapter_is_what_lmforge_loads_and_refused_otherwise(
        tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """axolotl's bfloat16: true loads the weights in bf16. With bf16: true and an adapter lmforge's frozen base weights
    are bf16 already (the notice says so, and the loaded model shows it); a full fine-tune in pure bf16 is refused."""
    from lmforge.device import resolve_bf16
    from lmforge.models.setup import training_model

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, bf16=True, bfloat16=True)
    assert [n.key for n in cfg.notices] == ["bfloat16"] and "nothing changes" in cfg.notices[0].text
    model = training_model(cfg, load_tokenizer(str(tiny_model_dir)), CPU, bf16=resolve_bf16(cfg.training.bf16, CPU))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    for extra in ({"adapter": None}, {"bf16": False}):  # pure bf16 weights: not what lmforge trains
        with pytest.raises(LmforgeError, match="bfloat16"):
            _cfg(tiny_model_dir, alpaca_file, tmp_path, bfloat16=True, **{"bf16": True, **extra})


def test_flash_attn_rms_norm_is_a_kernel_choice_with_a_notice_without_a_gpu(tiny_model_dir: Path, alpaca_file: Path,
                                                                           tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, flash_attn_rms_norm=True)
    assert [n.key for n in cfg.notices] == ["flash_attn_rms_norm"] and "compute the same" in cfg.notices[0].text
    with pytest.raises(LmforgeError, match="flash_attn_rms_norm") as err:  # on a GPU it would be asked to run: not built
        _cfg(tiny_model_dir, alpaca_file, tmp_path, gpu=True, flash_attn_rms_norm=True)
    assert "liger_rms_norm" in str(err.value.fix)


def test_dp_shard_size_is_fsdp_over_exactly_that_many_ranks(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """axolotl's dp_shard_size without replicated groups is FSDP over that many ranks. lmforge's FSDP2 shards over every
    rank, so a launch of another size stops before any engine starts; without FSDP the key is refused."""
    from lmforge.train.distributed import check_shard_size, engine_for

    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, dp_shard_size=2, fsdp_version=2,
               fsdp_config={"reshard_after_forward": True})
    assert cfg.distributed.dp_shard_size == 2 and not cfg.notices
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LmforgeError, match="shards the weights over 2 ranks and this run has 1") as err:
        engine_for(cfg, CPU)  # one process: the mesh asked for is not the one that would run
    assert "--nproc 2" in err.value.fix
    check_shard_size(2, 2)  # torchrun with two ranks: FSDP over both, as asked
    with pytest.raises(LmforgeError, match="dp_shard_size"):
        _cfg(tiny_model_dir, alpaca_file, tmp_path, dp_shard_size=2)  # no fsdp: nothing to shard with


def test_pretrain_multipack_attn_keeps_the_documents_of_a_window_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A window holding two documents gives, with pretrain_multipack_attn, the loss of the two documents trained
    alone (block-diagonal attention, no target across the boundary); without it the second document sees the first."""
    from lmforge.recipes.pretrain import _collator
    from lmforge.train.loss import causal_lm_loss
    from lmforge.train.objectives import PretrainCollator

    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos = tokenizer.eos_token_id
    first, second = [5, 6, 7, 8, eos], [9, 10, 11, 12, 13, 14]
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        apart = [causal_lm_loss(model, PretrainCollator("clm")([torch.tensor(doc)])) for doc in (first, second)]
        alone = sum(loss for loss, _ in apart).item()  # summed cross-entropy (causal_lm_loss's sum)
        window = [torch.tensor(first + second)]
        kept, kept_count = causal_lm_loss(model, PretrainCollator("clm", document_end_id=eos)(window))
        mixed, mixed_count = causal_lm_loss(model, PretrainCollator("clm")(window))
    assert kept_count == sum(count for _, count in apart) == mixed_count - 1
    assert kept.item() == pytest.approx(alone, rel=1e-5) and abs(mixed.item() - alone) > 1e-3

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\n", encoding="utf-8")
    config = {"base_model": str(tiny_model_dir), "pretraining_dataset": [str(corpus)], "sequence_len": 16,
              "output_dir": str(tmp_path / "out"), "pretrain_multipack_attn": True}
    cfg = load_config(str(write_config(tmp_path / "pretrain.yml", config)))
    assert _collator(cfg, tokenizer, 0).document_end_id == eos
    with pytest.raises(LmforgeError, match="pretrain_multipack_attn"):
        load_config(str(write_config(tmp_path / "mlm.yml", {**config, "objective": "mlm"})))


def test_eval_table_size_changes_nothing_without_the_trackers_axolotl_logs_it_to(tiny_model_dir: Path, alpaca_file: Path,
                                                                                 tmp_path: Path) -> None:
    """axolotl's prediction table goes to W&B or MLflow only: with neither set it is a notice; with one set it is
    refused (lmforge does not log the table yet)."""
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, eval_table_size=2)
    assert [n.key for n in cfg.notices] == ["eval_table_size"] and "nothing changes" in cfg.notices[0].text
    for tracker in ({"wandb_project": "p"}, {"mlflow_tracking_uri": str(tmp_path / "mlruns")}):
        with pytest.raises(LmforgeError, match="eval_table_size"):
            _cfg(tiny_model_dir, alpaca_file, tmp_path, eval_table_size=2, **tracker)


def test_full_finetune_without_an_adapter_is_what_runs_and_refused_beside_one(tiny_model_dir: Path, alpaca_file: Path,
                                                                              tmp_path: Path) -> None:
    cfg = _cfg(tiny_model_dir, alpaca_file, tmp_path, adapter=None, full_finetune=True)
    assert [n.key for n in cfg.notices] == ["full_finetune"] and cfg.adapter.adapter is None
    with pytest.raises(LmforgeError, match="full_finetune"):  # an adapter and a full fine-tune: a contradiction
        _cfg(tiny_model_dir, alpaca_file, tmp_path, full_finetune=True)


def test_muon_under_fsdp2_checkpoints_and_resumes_bit_identical(tiny_model_dir: Path, alpaca_file: Path,
                                                                 tmp_path: Path) -> None:
    """axolotl's muon-pretrain-fsdp2 example stopped at its first checkpoint (torch.distributed.checkpoint read the
    composite Muon+AdamW state dict as a torch one: KeyError 'state'). Its two optimizers are now saved as DCP's
    list of optimizers; a run resumed from step 2 ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from lmforge.recipes.finetune import run_train

    fsdp = {"fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}

    def run(name: str, **extra: object) -> Path:
        config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / name, adapter=None, optimizer="muon", max_steps=4,
                             save_steps=2, learning_rate=1e-3, fsdp_config=fsdp, **extra)
        config.pop("lora_r"), config.pop("lora_alpha"), config.pop("lora_target_linear")
        run_train(load_config(str(write_config(tmp_path / f"{name}.yml", config))))
        return tmp_path / name

    whole = run("whole")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run("resumed", resume_from_checkpoint="auto")
    expected, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
