"""Training on several ranks (torchrun, gloo on CPU): DDP and FSDP2 against one process, SIGKILL and resume,
an FSDP2 checkpoint of 2 ranks resumed on 1, two torchrun agents as two nodes over loopback.

The reference is always one process with the same global batch (gradient_accumulation_steps × 2):
N ranks must train exactly as it does, step by step. Runs are fp32 on a tiny Llama; one torchrun launch
trains all the DDP/FSDP configs (tests/distributed_runs.py) to keep the start-up cost to one. The SIGKILL
and two-node tests start torchrun themselves and are marked slow (CI runs them; `-m "not slow"` skips them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARITHMETIC, REPO, tiny_config, write_config, write_jsonl
from lmforge.config import load_config
from lmforge.recipes.pretrain import run_pretrain
from lmforge.recipes.finetune import run_train

STEPS = 8
SHAKESPEARE = "input.txt"
FSDP_CONFIG = {  # axolotl's spellings, the older fsdp_-prefixed ones included
    "fsdp_version": 2, "fsdp_offload_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "reshard_after_forward": True,
}
KINDS = ["ddp-lora", "ddp-full", "fsdp-lora", "fsdp-full", "fsdp-qlora"]
# The one-process reference of each adapter kind; QLoRA's is FSDP in one process too, so both store
# the 4-bit weights alike (bf16, the FSDP-QLoRA recipe) and quantize them the same.
REFERENCE_ENGINE = {"lora": "one", "full": "one", "qlora": "fsdp"}


def _config(model_dir: Path, data: Path, out: Path, kind: str, accumulation: int, **extra: object) -> dict:
    engine, adapter = kind.split("-")
    settings: dict = dict(
        adapter=None if adapter == "full" else adapter, micro_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, learning_rate=0.01 if adapter == "lora" else 0.002, lr_scheduler="cosine", warmup_steps=1,
        logging_steps=1, save_steps=2, val_set_size=4, eval_steps=4, eval_batch_size=2, seed=7,
    )
    if engine == "fsdp":
        settings["fsdp_config"] = FSDP_CONFIG
    if adapter == "full":
        settings.update(lora_r=None, lora_alpha=None, lora_target_linear=None)
    if adapter == "qlora":
        settings["load_in_4bit"] = True
    return {k: v for k, v in tiny_config(model_dir, data, out, **{**settings, **extra}).items() if v is not None}


def _pretrain_config(corpus: Path, shared: Path, out: Path, accumulation: int) -> dict:
    return {
        "model_config": {"architecture": "llama", "preset": "tiny"},
        "tokenizer_train": {"files": [str(corpus)], "vocab_size": 300, "output_dir": str(shared / "tokenizer")},
        "pretraining_dataset": [str(corpus)], "shards_dir": str(shared / "shards"), "sequence_len": 32, "val_set_size": 0.1,
        "micro_batch_size": 4, "gradient_accumulation_steps": accumulation, "max_steps": STEPS, "learning_rate": 0.005,
        "lr_scheduler": "cosine", "warmup_steps": 1, "save_steps": 4, "eval_steps": 4, "bf16": False, "logging_steps": 1,
        "seed": 3, "output_dir": str(out),
    }


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _history(out: Path) -> list[tuple[int, float]]:
    checkpoint = out / f"checkpoint-{STEPS}"
    return [tuple(p) for p in json.loads((checkpoint / "trainer_state.json").read_text())["loop"]["train_history"]]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


def _assert_close_runs(out: Path, reference: Path, atol: float = 1e-4) -> None:
    ours, ref = _history(out), _history(reference)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(ours, ref))
    assert worst < atol, f"per-step loss differs from one rank by {worst:.2e}: {ours} vs {ref}"
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert abs(summary["eval_loss_end"] - ref_summary["eval_loss_end"]) < atol
    assert summary["total_tokens"] == ref_summary["total_tokens"]
    weights, ref_weights = _weights(out), _weights(reference)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=atol, rtol=1e-3, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders: one process per adapter kind (`ref-lora`, `ref-full`, `ref-qlora`), and the 2-rank runs."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "arith.jsonl", ARITHMETIC)
    folders = {}
    for adapter, engine in REFERENCE_ENGINE.items():
        out = root / f"ref-{adapter}"
        config = _config(tiny_model_dir, data, out, f"{engine}-{adapter}", 4)
        run_train(load_config(str(write_config(root / f"ref-{adapter}.yml", config))))
        folders[f"ref-{adapter}"] = out
    configs = []
    for kind in KINDS:
        folders[kind] = root / kind
        configs.append(str(write_config(root / f"{kind}.yml", _config(tiny_model_dir, data, root / kind, kind, 2))))
    # Pretraining from scratch: the reference trains the tokenizer and writes the shards, the 2 ranks reuse them.
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare" / SHAKESPEARE).read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    for name, accumulation in (("ref-pretrain", 4), ("pretrain", 2)):
        folders[name] = root / name
        config = _pretrain_config(corpus, root / "shared", root / name, accumulation)
        if name == "ref-pretrain":
            run_pretrain(load_config(str(write_config(root / f"{name}.yml", config))))
        else:
            configs.append(str(write_config(root / f"{name}.yml", config)))
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", str(REPO / "tests" / "distributed_runs.py"), *configs),
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    folders["root"], folders["data"] = root, data
    return folders


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_train_as_one_process_with_the_same_global_batch(kind: str, runs: dict[str, Path]) -> None:
    out = runs[kind]
    _assert_close_runs(out, runs[f"ref-{kind.split('-')[1]}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["engine"] == ("DDP" if kind.startswith("ddp") else "FSDP2")
    if kind.startswith("fsdp"):  # checkpoints hold DCP shards of both ranks, the output plain safetensors
        assert sorted(p.name for p in (out / "checkpoint-2" / "dcp").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
        assert not (out / "checkpoint-2" / "model.safetensors").exists()


def test_pretraining_on_two_ranks_trains_as_one_process(runs: dict[str, Path]) -> None:
    """DDP pretraining from scratch: token windows dealt to the ranks, the same per-step loss and weights."""
    _assert_close_runs(runs["pretrain"], runs["ref-pretrain"])
    assert json.loads((runs["pretrain"] / "summary.json").read_text())["ranks"] == 2


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one(tiny_model_dir: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    """The DCP shards of 2 ranks, resumed by one process (same global batch): it ends where the 2-rank run did."""
    out = tmp_path / "one"
    out.mkdir()
    shutil.copytree(runs["fsdp-full"] / "checkpoint-4", out / "checkpoint-4")
    config = _config(tiny_model_dir, runs["data"], out, "fsdp-full", 4, resume_from_checkpoint="auto")
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert summary["resumed_from"] == str(out / "checkpoint-4") and summary["ranks"] == 1
    _assert_close_runs(out, runs["fsdp-full"])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_children(int(child))]
    return found


@pytest.mark.slow  # two more torchrun launches (~1 min on 2 cores); runs in CI's full suite
def test_sigkill_under_two_ranks_then_resume_auto_ends_as_uninterrupted(tiny_model_dir: Path, runs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "killed"
    config = write_config(tmp_path / "kill.yml", _config(tiny_model_dir, runs["data"], out, "fsdp-full", 2))
    command = [sys.executable, "-m", "lmforge", "train", str(config), "--nproc", "2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2").exists():
        assert proc.poll() is None, f"the run ended before checkpoint-2:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for pid in [proc.pid, *_children(proc.pid)]:  # torchrun and both ranks, as a machine failure would
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before the kill: the test proves nothing"

    resumed = subprocess.run([*command, "--resume_from_checkpoint=auto"], cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "resumed from" in resumed.stdout and resumed.stdout.count("[lmforge] resumed from") == 1  # rank 0 speaks
    weights, reference = _weights(out), _weights(runs["fsdp-full"])
    assert all(torch.equal(weights[k], reference[k]) for k in reference), "weights differ from the uninterrupted run"
    assert _history(out) == _history(runs["fsdp-full"])


@pytest.mark.slow  # two torchrun agents (~40 s on 2 cores); runs in CI's full suite
def test_two_torchrun_agents_over_loopback_train_as_two_nodes(tiny_model_dir: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    config = write_config(tmp_path / "nodes.yml", _config(tiny_model_dir, runs["data"], out, "ddp-lora", 2))
    port = _free_port()
    agents = [subprocess.Popen(_torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv-backend=static",
                                         f"--master_addr=127.0.0.1", f"--master_port={port}", "-m", "lmforge", "train", str(config)),
                               cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in (0, 1)]
    logs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "2 rank(s)" in logs[0] and "[lmforge]" not in logs[1]  # rank 0 (node 0) speaks, node 1 is silent
    _assert_close_runs(out, runs["ddp-lora"], atol=1e-6)


@pytest.mark.parametrize("engine, run", [("FSDPEngine", "an FSDP run"), ("DeepSpeedEngine", "a deepspeed run")])
def test_resuming_a_checkpoint_without_the_engines_shards_is_one_line(engine: str, run: str, tmp_path: Path) -> None:
    """FSDP and DeepSpeed share ShardedEngine's checkpoint read: a folder without their shards is refused by name."""
    from lmforge.errors import LmforgeError
    from lmforge.train import deepspeed, distributed

    cls = getattr(distributed, engine, None) or getattr(deepspeed, engine)
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    read = cls.__new__(cls).load_weights(None, None)  # no process group: the check comes before any shard is read
    with pytest.raises(LmforgeError, match=f"checkpoint-4 holds no .*: it was not saved by {run}") as caught:
        read(folder)
    assert caught.value.fix.startswith(f"resume it without {'fsdp' if 'FSDP' in run else 'deepspeed'}")
