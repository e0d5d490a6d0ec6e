"""DeepSpeed ZeRO on 2 CPU ranks (its CPU accelerator, gloo): ZeRO-2 and ZeRO-3 train as one process with
the same global batch, the ZeRO-3 adapter is saved whole (not the empty-adapter trap), and a ZeRO-3
checkpoint resumes to the uninterrupted weights.

Skipped where deepspeed is not installed (`pip install 'lmforge[deepspeed]'`); slow: its first use on a
machine JIT-builds a small C++ shared-memory op (minutes on 2 cores, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ARITHMETIC, REPO, write_config, write_jsonl
from lmforge.config import load_config
from lmforge.recipes.train import run_train
from test_distributed import _assert_close_runs, _config, _env, _torchrun, _weights

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

KINDS = {"zero2-lora": "zero2.json", "zero3-lora": "zero3.json", "zero3-full": "zero3.json"}


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
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", str(REPO / "tests" / "distributed_runs.py"), *configs),
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return folders


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_on_two_cpu_ranks_trains_as_one_process(kind: str, ds_runs: dict[str, Path]) -> None:
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
