"""TensorBoard, W&B (offline) and MLflow (local file store) receive the same metrics, read back by their own readers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.recipes.finetune import run_train
from lmforge.train.schedules import lr_multiplier

TRAIN_METRICS = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "peak_memory_mb"}
EVAL_METRICS = {"eval_loss", "eval_perplexity"}


def _wandb_history(run_file: Path) -> dict[str, dict[int, float]]:
    """W&B's offline run file: LevelDB-style log records (7-byte header, 32 KiB blocks) holding wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    history.setdefault(key, {})[items["_step"]] = value
    return history


def test_tensorboard_wandb_and_mlflow_hold_the_same_metrics(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    total = 8
    cfg = tiny_config(
        tiny_model_dir, alpaca_file, out, max_steps=total, logging_steps=1, val_set_size=4, eval_steps=4,
        lr_scheduler="cosine", cosine_min_lr_ratio=0.1, warmup_ratio=0.25, learning_rate=0.01,
        wandb_project="lmforge-test", wandb_mode="offline", wandb_name="tiny",
        mlflow_tracking_uri=f"file:{tmp_path / 'mlruns'}", mlflow_experiment_name="tiny",
    )
    run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out))
    tb.Reload()
    assert TRAIN_METRICS | EVAL_METRICS <= set(tb.Tags()["scalars"])
    board = {tag: {e.step: e.value for e in tb.Scalars(tag)} for tag in TRAIN_METRICS | EVAL_METRICS}
    assert sorted(board["loss"]) == list(range(1, total + 1))
    assert sorted(board["eval_loss"]) == [0, 4, 8]
    # lr logged after step s is the one step s+1 uses: warmup 2 steps, cosine down to 10% of 0.01.
    for step, lr in board["lr"].items():
        assert lr == pytest.approx(0.01 * lr_multiplier("cosine", step, total, 2, 0.1), rel=1e-5)
    assert board["tokens_seen"][total] > board["tokens_seen"][1] > 0

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    wandb = _wandb_history(runs[0])
    mlflow_dir = tmp_path / "mlruns"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{mlflow_dir}")
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.01"
    for metric in TRAIN_METRICS | EVAL_METRICS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        assert history.keys() == board[metric].keys(), metric
        assert wandb[metric].keys() == board[metric].keys(), metric
        for step, value in board[metric].items():  # TensorBoard stores float32
            assert history[step] == pytest.approx(value, rel=1e-6), (metric, step)
            assert wandb[metric][step] == pytest.approx(value, rel=1e-6), (metric, step)
