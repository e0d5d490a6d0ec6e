"""What a GPU run would hit, caught on the CPU (issue 29, items 6, 7 and 8).

- Host-device syncs (item 7): the tiny Llama runs on the meta device, where a tensor has a shape but no
  values. A dispatch-level spy records every read of a device value (`bool()`, `int()`, `float()`,
  `.item()`, `.tolist()`, a copy to the host, boolean-mask indexing) and names who asked for it. On a
  GPU each one is a sync that stalls the kernel queue; the training step may make one per step.
- Eval memory (item 6): an allocation spy records the largest tensor each phase creates. The step-0
  eval must not need more than a training step, or a run that fits thanks to the chunked (or fused)
  loss dies before its first step.
- Precision at the end of a run (item 8): the tiny LoRA and pretrain runs with `bf16: true`, as on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ARITHMETIC, build_tiny_tokenizer, tiny_config, tiny_llama_config, write_config, write_jsonl
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.data.prepare import Example
from lmforge.train.loop import LoopSettings, _to_device, evaluate_sums, train_loop
from lmforge.train.loss import causal_lm_loss

aten = torch.ops.aten
REPO = Path(__file__).resolve().parents[1]
LMFORGE = str(REPO / "lmforge") + os.sep
META = torch.device("meta")

# Examples with prompt tokens (label -100) and of different lengths, so the collated batch is padded.
EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]),
            Example([1, 5, 11, 12, 2], [-100, -100, 11, 12, 2])]
UNPADDED = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]),
            Example([1, 5, 11, 12, 13, 14, 15, 2], [-100, -100, -100, 12, 13, 14, 15, 2])]


# ----------------------------------------------------------------------------- the sync spy


def _on_device(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _asker() -> str:
    """The innermost caller outside torch and this file: 'lmforge/...:line (function)' or a library's."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if name == __file__ or f"{os.sep}torch{os.sep}" in name:
            continue
        where = name[len(str(REPO)) + 1:] if name.startswith(LMFORGE) else name.split("site-packages" + os.sep)[-1]
        return f"{where}:{frame.lineno} ({frame.name})"
    return "?"


class SyncSpy(TorchDispatchMode):
    """Records every op that reads a device tensor's values on the host, with who asked.

    On the meta device those ops would raise; the spy answers them with stand-in values (True, 1,
    ones, every position selected) so the step runs to the end and every sync is counted, not just
    the first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _on_device(args[0]):  # bool(), int(), float(), .item()
            self.syncs.append((_asker(), "read a value"))
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        if func in (aten.nonzero.default, aten.masked_select.default) and _on_device(args[0]):  # boolean-mask indexing
            self.syncs.append((_asker(), "count a mask"))
            return torch.ones(args[0].shape, dtype=torch.bool).nonzero().to(args[0].device)
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool and _on_device(i) for i in args[1]):
            self.syncs.append((_asker(), "index with a boolean mask"))  # the mask's count decides the shape
            indices: list = []
            for i in args[1]:
                is_mask = i is not None and i.dtype == torch.bool
                indices += [j.to(i.device) for j in torch.ones(i.shape, dtype=torch.bool).nonzero(as_tuple=True)] if is_mask else [i]
            return func(args[0], indices)
        to_host = func in (aten._to_copy.default, aten._copy_from.default) and _on_device(args[0]) and (
            str(kwargs.get("device", args[1].device if len(args) > 1 and isinstance(args[1], torch.Tensor) else "")) == "cpu")
        if to_host:  # .tolist(), .cpu(), .numpy()
            self.syncs.append((_asker(), "copy to the host"))
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)

    def ours(self) -> list[str]:
        return [f"{who}: {what}" for who, what in self.syncs if who.startswith("lmforge")]

    def libraries(self) -> list[str]:
        return [f"{who}: {what}" for who, what in self.syncs if not who.startswith("lmforge")]


def _meta_llama() -> Any:
    from transformers import LlamaForCausalLM

    with META:
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=32))
    return model


# ----------------------------------------------------------------------------- item 7: host syncs


def _packed() -> dict[str, torch.Tensor]:
    """Two rows of two examples each, position ids restarting per example (as data.batching packs them)."""
    batch = collate(UNPADDED, 0)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4]])
    return batch


@pytest.mark.parametrize("make", [lambda: collate(EXAMPLES, 0), lambda: collate(UNPADDED, 0), _packed],
                         ids=["padded", "unpadded", "packed"])
def test_causal_lm_loss_reads_nothing_back_from_the_device(make: Any) -> None:
    """Forward and backward of the loss on a device batch: lmforge itself reads no device value."""
    model = _meta_llama()
    batch = make()
    expected_count = int((batch["labels"][:, 1:] != -100).sum())
    spy = SyncSpy()
    with spy:
        loss_sum, count = causal_lm_loss(model, _to_device(batch, META))
        loss_sum.backward()
    assert spy.ours() == []
    assert count == expected_count and loss_sum.shape == ()
    # transformers' mask builder reads one value per forward (masking_utils: a padding or a packing check);
    # that one is the library's, pinned here so that a change shows up.
    assert len(spy.libraries()) <= 1, spy.libraries()


def test_masked_lm_objective_reads_nothing_back_from_the_device() -> None:
    """The MLM objective gathers its masked positions by integer indices found on the host copy (pretrain's
    mlm_loss indexed with a boolean mask and counted it on the device: two syncs per micro-batch)."""
    from lmforge.train.objectives import MaskedLM

    model = _meta_llama()
    batch = collate(UNPADDED, 0)
    spy = SyncSpy()
    with spy:
        loss_sum, count, _ = MaskedLM()(model, _to_device(batch, META))
        loss_sum.backward()
    assert spy.ours() == []
    assert count == MaskedLM().count_tokens(batch) == int((batch["labels"] != -100).sum())


def test_a_training_step_syncs_once_not_per_micro_batch() -> None:
    """Two optimizer steps of three micro-batches on the meta device: one read-back per step (the loss and
    the gradient norm, together), none per micro-batch; nothing else of lmforge's reads a device value."""
    model = _meta_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    settings = LoopSettings(total_steps=2, grad_accum=3, logging_steps=1, device=META, timing_warmup_steps=0,
                            show_progress=False)
    spy = SyncSpy()
    with spy:
        result = train_loop(model, optimizer, scheduler, iter([collate(EXAMPLES, 0) for _ in range(6)]), settings)
    assert result.steps == 2
    assert len(spy.ours()) == 2, spy.ours()
    assert all("(_read_back)" in line for line in spy.ours()), spy.ours()
    assert len(spy.libraries()) <= 6, spy.libraries()  # at most transformers' one per forward


def test_evaluation_reads_back_once() -> None:
    model = _meta_llama()
    spy = SyncSpy()
    with spy:
        total, count = evaluate_sums(model, iter([collate(EXAMPLES, 0) for _ in range(3)]), LoopSettings(0, device=META))
    assert count == 3 * int((collate(EXAMPLES, 0)["labels"][:, 1:] != -100).sum())
    assert len(spy.ours()) == 1, spy.ours()


def test_the_gathered_loss_equals_the_masked_loss_on_a_device_batch(tiny_model_dir: Path) -> None:
    """The integer-index gather with the host copy gives what boolean-mask indexing of the full logits gives."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lmforge.data.batching import HOST_COPY, HostCopy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate(EXAMPLES, 0)
    device_batch = {**batch, HOST_COPY: HostCopy({k: v.clone() for k, v in batch.items()})}
    loss_sum, count = causal_lm_loss(model, device_batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    reference = F.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum")
    assert count == int(keep.sum())
    torch.testing.assert_close(loss_sum.detach(), reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- item 6: eval memory


class AllocationSpy(TorchDispatchMode):
    """The largest tensor any op creates, per phase: 'eval' inside evaluation, 'train' in the training loop,
    'setup' before (loading weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.largest: dict[str, int] = {"setup": 0, "train": 0, "eval": 0}
        self.where: dict[str, tuple] = {}  # phase -> (op, shape, who asked) of its largest tensor

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # a new allocation: not a view (nor an in-place result) of an input
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.numel() * t.element_size() > self.largest[self.phase]:
                    self.largest[self.phase] = t.numel() * t.element_size()
                    self.where[self.phase] = (str(func), tuple(t.shape), _asker())
        return out

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before


def test_the_step0_eval_needs_no_more_memory_than_a_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chunked_cross_entropy on, a 4096-token vocabulary (so the logits are by far the largest tensor): the
    evaluations of `lmforge train` (step 0 and the last step) allocate no tensor larger than a training step's."""
    import lmforge.recipes.run as training
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "model"
    tokenizer = build_tiny_tokenizer(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(model_dir)
    assert len(tokenizer) < 4096
    spy = AllocationSpy()
    evaluate, train_loop = training.evaluate, training.train_loop

    def spied_evaluate(*args: Any, **kwargs: Any) -> float:
        with spy.during("eval"):
            return evaluate(*args, **kwargs)

    def spied_train_loop(*args: Any, **kwargs: Any) -> Any:
        with spy.during("train"):
            return train_loop(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", spied_evaluate)
    monkeypatch.setattr(training, "train_loop", spied_train_loop)
    data = write_jsonl(tmp_path / "arith.jsonl", ARITHMETIC)
    config = tiny_config(model_dir, data, tmp_path / "out", max_steps=2, val_set_size=0.2, chunked_cross_entropy=True,
                         save_strategy="no")
    from lmforge.recipes.finetune import run_train

    cfg = load_config(str(write_config(tmp_path / "c.yml", config)))
    with spy:
        summary = run_train(cfg)
    assert summary["eval_loss_start"] is not None and len(summary["eval_history"]) == 1
    # Unchunked (today's main), one eval batch's fp32 logits are 24 labelled tokens x 4096 x 4 bytes = 384 KiB,
    # eight times a training step's largest slice.
    # Every ARITHMETIC answer has the same number of labelled tokens, so a full eval batch and a micro-batch
    # have the same slice sizes.
    assert spy.largest["eval"] <= spy.largest["train"], (spy.largest, spy.where)


def test_chunked_loss_under_no_grad_equals_the_plain_loss(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate(EXAMPLES, 0)
    with torch.no_grad():
        plain, n = causal_lm_loss(model, batch)
        chunked, m = causal_lm_loss(model, batch, loss_chunks=4)
    assert n == m
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- item 8: bf16 as on a GPU
# bf16: true on every CPU (auto picks fp32 where bf16 is emulated): the GPU's dtype mix, a bf16 base under fp32
# LoRA weights. Two steps of the tiny model: seconds with native bf16, still small where AVX2 emulates it.


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text((REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    return path


def _short_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's own sample, 4 tokens instead of 60 (tiny bf16 matmuls are slow on a CPU)."""
    import lmforge.recipes.pretrain as pretrain

    monkeypatch.setattr(pretrain, "clm_sample", partial(pretrain.clm_sample, max_new_tokens=4))


def test_lora_pretraining_in_bf16_finishes_its_eval_and_sample(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The final eval and the sample ran without the training autocast: a dtype error after the whole run."""
    from lmforge.recipes.pretrain import run_pretrain

    _short_samples(monkeypatch)
    config = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(_corpus(tmp_path)), "type": "completion"}],
              "sequence_len": 32, "val_set_size": 0.1, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 0.005,
              "bf16": True, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
              "sample_prompt": "the cat", "save_strategy": "no", "output_dir": str(tmp_path / "out")}
    summary = run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert summary["steps"] == 2 and summary["sample"].startswith("the cat")
    # The final eval runs in the same precision as the step-0 eval it is compared with.
    assert abs(summary["eval_loss"] - summary["eval_history"][-1][1]) < 1e-6


def test_pretraining_from_scratch_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes.pretrain import run_pretrain

    _short_samples(monkeypatch)
    corpus = _corpus(tmp_path)
    config = {"model_config": {"architecture": "llama", "preset": "tiny"},
              "tokenizer_train": {"files": [str(corpus)], "vocab_size": 300}, "pretraining_dataset": [str(corpus)],
              "sequence_len": 32, "val_set_size": 0.1, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 0.005,
              "bf16": True, "sample_prompt": "ROMEO:", "save_strategy": "no", "output_dir": str(tmp_path / "out")}
    summary = run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert summary["steps"] == 2 and summary["sample"].startswith("ROMEO:")


def test_lora_training_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lmforge.recipes.finetune import run_train

    data = write_jsonl(tmp_path / "arith.jsonl", ARITHMETIC)
    config = tiny_config(tiny_model_dir, data, tmp_path / "out", bf16=True, max_steps=2, val_set_size=0.2,
                         save_strategy="no")
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert summary["steps"] == 2 and summary["eval_loss_end"] is not None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
