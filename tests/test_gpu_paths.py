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

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import random_examples
from lmforge.data.batching import collate, iterate_batches, pad_batch
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
    examples = random_examples(24, model.config.vocab_size)
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
    examples = random_examples(8, model.config.vocab_size, seed=3)
    with torch.no_grad():
        alone = sum(float(causal_lm_loss(model, collate([e], 0))[0]) for e in examples)
        batched = sum(float(causal_lm_loss(model, collate(examples[i:i + 4], 0))[0]) for i in range(0, 8, 4))
    assert cpu_flash_attention["varlen"] > 0 and cpu_flash_attention["dense"] > 0
    assert batched == pytest.approx(alone, rel=1e-5)


# --- a mocked CUDA ------------------------------------------------------------------------------------------------------

CARDS = {  # compute capability -> (name, memory GiB): one card per generation that matters for bf16
    (7, 0): ("Tesla V100-SXM2-16GB", 16), (7, 5): ("Tesla T4", 15), (8, 0): ("NVIDIA A100-SXM4-80GB", 80),
    (9, 0): ("NVIDIA H100 80GB HBM3", 80),
}


@pytest.fixture
def mock_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`mock_cuda((8, 0))`: this process sees one CUDA GPU of that compute capability.

    torch.cuda.is_bf16_supported() answers as torch does on such a card: True everywhere by default
    (bf16 is emulated below sm 8.0), True from sm 8.0 only with including_emulation=False.
    """

    import bitsandbytes  # noqa: F401  (imported before the mock: at import it would load its CUDA backend)
    import peft  # noqa: F401

    def install(capability: tuple[int, int]) -> SimpleNamespace:
        name, memory = CARDS[capability]
        props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=memory * 2**30,
                                multi_processor_count=108)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))
        return props

    return install


@pytest.mark.parametrize("capability, native_bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_auto_is_on_only_where_the_card_has_bf16_tensor_cores(mock_cuda: Any, tiny_model_dir: Path, alpaca_file: Path,
                                                                   tmp_path: Path, capability: tuple[int, int],
                                                                   native_bf16: bool) -> None:
    """Item 3: V100 (7.0) and T4 (7.5) emulate bf16; `bf16: auto` must train them in fp32, and the planner must say so."""
    from lmforge.plan.predict import current_device
    from lmforge.recipes.run import TrainingRun
    from lmforge.device import pick_device, resolve_bf16

    mock_cuda(capability)
    assert pick_device() == torch.device("cuda")
    assert resolve_bf16("auto", pick_device()) is native_bf16
    assert resolve_bf16(True, pick_device()) is True  # asked for explicitly: the user's choice stands
    run = TrainingRun(_config(tiny_model_dir, alpaca_file, tmp_path, bf16="auto"))  # the path `lmforge train` takes
    assert run.device.type == "cuda" and run.bf16 is native_bf16
    assert run.autocast_dtype == (torch.bfloat16 if native_bf16 else None)
    row = current_device("cuda")  # the planner's row for this machine's GPU
    assert row.name == CARDS[capability][0] and row.bf16 is native_bf16 and row.memory_gib == pytest.approx(CARDS[capability][1])


def _config(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, **keys: Any) -> Any:
    from conftest import tiny_config, write_config
    from lmforge.config import load_config

    path = write_config(tmp_path / "config.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", **keys))
    return load_config(str(path), gpu=True)


@pytest.mark.parametrize("engine_name", ["fsdp2", "zero3"])
def test_kernels_are_chosen_for_the_gpu_that_trains_not_the_cpu_that_loads(
        mock_cuda: Any, tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        engine_name: str) -> None:
    """Item 2: FSDP2 and ZeRO-3 load the weights on the CPU; flash attention, Liger and torch_compile: auto must still
    see the GPU the model trains on (they silently turned off, each saying a false "needs CUDA")."""
    import lmforge.models.setup as setup
    from lmforge.models.load import load_tokenizer
    from lmforge.recipes.run import TrainingRun
    from lmforge.train.deepspeed import DeepSpeedEngine
    from lmforge.train.distributed import FSDPEngine

    mock_cuda((9, 0))
    monkeypatch.setattr("lmforge.config.checks._installed", lambda module: True, raising=False)  # flash-attn installed
    cfg = _config(tiny_model_dir, alpaca_file, tmp_path, attn_implementation="flash_attention_2", liger_rms_norm=True,
                  torch_compile="auto", torch_compile_backend="eager")
    engine: Any = object.__new__(FSDPEngine if engine_name == "fsdp2" else DeepSpeedEngine)  # no process group here
    engine.device, engine.stage = torch.device("cuda", 0), 3
    engine.prepare = lambda model, cfg, bf16, say: model
    assert engine.load_device == torch.device("cpu")  # these engines do load on the CPU
    monkeypatch.setattr("lmforge.recipes.run.engine_for", lambda cfg, device: engine)
    seen: dict[str, torch.device] = {}

    def attention(requested: str, device: torch.device, say: Any) -> str:
        seen["attention"] = device
        return "sdpa"  # the CPU cannot load flash kernels; which device decided is what counts

    def liger(model: Any, speed: Any, device: torch.device, say: Any) -> list[str]:
        seen["liger"] = device
        return []

    monkeypatch.setattr(setup, "attention_backend", attention)
    monkeypatch.setattr(setup, "apply_liger", liger)
    said: list[str] = []
    monkeypatch.setattr("lmforge.recipes.run.say", said.append)
    run = TrainingRun(cfg)
    model = run.model(load_tokenizer(str(tiny_model_dir)))
    assert seen == {"attention": torch.device("cuda", 0), "liger": torch.device("cuda", 0)}
    assert next(model.parameters()).device.type == "cpu"  # loaded where the engine asked
    assert all(layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers)  # torch_compile: auto saw CUDA
    assert not [line for line in said if "needs CUDA" in line], said


@pytest.mark.parametrize("key, value", [("flash_attention", True), ("attn_implementation", "flash_attention_2")])
def test_flash_attention_without_flash_attn_is_refused_before_the_model_loads(tiny_model_dir: Path, alpaca_file: Path,
                                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                              key: str, value: Any) -> None:
    """Item 12: with a GPU but no flash-attn, validate says so in one line naming the key and the fix (transformers
    failed only while loading the model)."""
    import sys

    from lmforge.errors import LmforgeError
    from lmforge.models import kernels

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, even where CI has it
    with pytest.raises(LmforgeError) as refused:
        _config(tiny_model_dir, alpaca_file, tmp_path, **{key: value})
    line = refused.value.format()
    assert "\n" not in line and f"config.yml:{_line_of(tmp_path / 'config.yml', key)}" in line
    assert f"{key} asks for flash_attention_2, which needs the flash-attn package" in line
    assert "pip install flash-attn" in line and "attn_implementation: sdpa" in line
    with pytest.raises(LmforgeError, match="needs the flash-attn package"):  # a config validated elsewhere
        kernels.attention_backend("flash_attention_2", torch.device("cuda"), print)
    assert kernels.attention_backend("flash_attention_2", torch.device("cpu"), lambda line: None) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(__spec__=SimpleNamespace()))  # installed
    assert _config(tiny_model_dir, alpaca_file, tmp_path, **{key: value}).model.attn_implementation == "flash_attention_2"
    assert kernels.attention_backend("flash_attention_2", torch.device("cuda"), print) == "flash_attention_2"


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


# --- activation offloading ------------------------------------------------------------------------------------------


def _same_as_a_weight(tensor: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Independent of lmforge's test: the tensor holds a parameter's values (as is, transposed, or cast)."""
    for p in params:
        for weight in (p, p.t()) if p.dim() == 2 else (p,):
            if tensor.shape == weight.shape and torch.equal(tensor.float(), weight.detach().to(tensor.dtype).float()):
                return True
    return False


@pytest.mark.parametrize("frozen, autocast", [(False, None), (False, torch.bfloat16), (True, None)])
def test_activation_offloading_moves_activations_and_leaves_the_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         frozen: bool, autocast: torch.dtype | None) -> None:
    """Also noticed: save_on_cpu copied every saved weight (linear saves weight.t()) to the host and back each micro-batch."""
    from lmforge.models.load import load_model
    from lmforge.train.loop import LoopSettings, train_loop

    moved: list[torch.Tensor] = []
    real_init = torch.autograd.graph.saved_tensors_hooks.__init__

    def spying_init(self: Any, pack: Any, unpack: Any) -> None:  # sees whatever hooks the loop installs
        def spy(tensor: torch.Tensor) -> Any:
            packed = pack(tensor)
            if not isinstance(packed, torch.Tensor):  # went to the host (kept tensors come back as themselves)
                moved.append(tensor)
            return packed

        real_init(self, spy, unpack)

    model = load_model(str(tiny_model_dir))
    if frozen:  # the decoder layers' weights frozen, as a LoRA base's (gradients still flow through them)
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." not in name)
    params = list(model.parameters())
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    examples = random_examples(4, model.config.vocab_size)
    monkeypatch.setattr(torch.autograd.graph.saved_tensors_hooks, "__init__", spying_init)
    train_loop(model, optimizer, scheduler, iter([collate(examples, 0)]),
               LoopSettings(total_steps=1, timing_warmup_steps=0, offload_activations=True, autocast_dtype=autocast))
    assert len(moved) > 10  # the activations went
    weights = [t for t in moved if _same_as_a_weight(t, params)]
    assert not weights, [tuple(t.shape) for t in weights]


# --- plan --measure ---------------------------------------------------------------------------------------------------


def test_measure_on_a_gpu_divides_by_that_gpus_matmul_ceiling(mock_cuda: Any, tiny_model_dir: Path, alpaca_file: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also noticed: `plan --measure` divided GPU tokens/s by a CPU matmul ceiling (MFU over 100%)."""
    from lmforge.recipes import plan

    mock_cuda((9, 0))
    asked: list[dict[str, Any]] = []

    def ceiling(dtypes: tuple[str, ...], *args: Any, **kwargs: Any) -> dict[str, float]:
        asked.append({"dtypes": dtypes, **kwargs})
        return {dtype: 700_000.0 for dtype in dtypes}

    monkeypatch.setattr(plan, "matmul_ceiling", ceiling)
    monkeypatch.setattr("lmforge.recipes.finetune.run_train", lambda cfg: {"steps": 5, "tokens_per_s": 1e5})
    measured, cpu_ceiling = plan.measure_here(_config(tiny_model_dir, alpaca_file, tmp_path, bf16="auto"))
    assert [torch.device(a.get("device", "cpu")).type for a in asked] == ["cuda"] and asked[0]["dtypes"] == ("bf16",)
    assert measured.device == "NVIDIA H100 80GB HBM3" and measured.ceiling_gflops == 700_000.0
    assert cpu_ceiling is None  # the report's CPU row must not take the GPU's ceiling for its own


def test_matmul_ceiling_runs_its_gemms_on_the_device_it_is_given() -> None:
    from lmforge.plan.measure import matmul_ceiling

    rates = matmul_ceiling(("fp32",), seconds=0.03, device=torch.device("cpu"))
    assert rates["fp32"] > 0


# --- CUDA RNG states on resume --------------------------------------------------------------------------------------


def test_resume_restores_the_cuda_rng_states_of_the_gpus_present(mock_cuda: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also noticed: a checkpoint saved on 8 GPUs failed to resume where fewer are visible (set_rng_state_all)."""
    import torch.cuda.random as cuda_random

    from lmforge.train.checkpoint import rng_state, set_rng_state

    saved = {**rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}
    mock_cuda((8, 0))  # one GPU visible now
    restored: list[int] = []

    def set_state(state: torch.Tensor, device: Any = "cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"invalid device ordinal {index}")  # what CUDA says
        restored.append(int(state[0]))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(cuda_random, "set_rng_state", set_state)
    note = set_rng_state(saved)
    assert restored == [0]
    assert note and "8 GPUs" in note and "1 visible" in note


def test_cpu_ram_efficient_loading_is_named_as_not_acted_on(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """Also noticed: the key is accepted; validate must say that every rank still reads the weights."""
    cfg = _config(tiny_model_dir, alpaca_file, tmp_path, fsdp_config={"cpu_ram_efficient_loading": True})
    notes = [n.text for n in cfg.notices if n.key == "fsdp_config"]
    assert len(notes) == 1 and "every rank reads the weights" in notes[0] and "not implemented yet" in notes[0]
