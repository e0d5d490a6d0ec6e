"""The lm-evaluation-harness bridge: lm-eval's tasks and scoring, run on the model lmforge loaded.

lmforge hands lm-eval's ``HFLM`` the model object it already loaded (base, adapter applied, merged
folder, GGUF or checkpoint, all through :mod:`lmforge.models.trained`) and its tokenizer, then calls
``lm_eval.simple_evaluate``: the prompts, few-shot examples, filters, metrics and standard errors are
lm-eval's own.

Tasks whose data ships with lmforge live in ``data/lm_eval_tasks/`` (lm-eval task YAMLs over files
in ``data/``): ``gsm8k_local`` (lm-eval's gsm8k over data/gsm8k) and ``mmlu_dev_local`` (MMLU's dev
questions, data/mmlu_dev). They run offline. lm-eval's built-in tasks read their data from the
Hugging Face Hub; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable) they are
refused in one line that says how to run them.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

LOCAL_TASKS_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "lm_eval_tasks"
HUB_HOST = ("huggingface.co", 443)


def local_task_names() -> list[str]:
    return sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool) -> Any:
    """lm-eval's TaskManager over the shipped task folder (and lm-eval's own tasks: a 10-20 s scan, done once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def offline() -> bool:
    """True when the Hub cannot be used: the HF offline switches are on, or huggingface.co does not answer in 3 s."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        return False
    except OSError:
        return True


def _data_files(cfg: dict[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    return [f for v in values for f in ([v] if isinstance(v, str) else v)]


def check_tasks(tasks: Sequence[str], where: str = "--tasks") -> Any:
    """The TaskManager that holds ``tasks``; an unknown name, a Hub task offline, or a missing data file refused in one line."""
    if not tasks:
        raise LmforgeError("no lm-eval task named", where=where, fix=f"name one, e.g. {', '.join(local_task_names())}")
    local = task_manager(False)
    manager = local
    if not all(t in local.all_tasks for t in tasks):
        manager = task_manager(True)  # lm-eval's own tasks too
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(manager.all_tasks), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise LmforgeError(f"unknown lm-eval task '{unknown[0]}'", where=where,
                               fix=f"{hint}local tasks (offline): {', '.join(local_task_names())}; all tasks: lm-eval --tasks list")
        hub = [t for t in tasks if t not in local.all_tasks]
        if hub and offline():
            entry = manager.task_index.get(hub[0])
            dataset = (getattr(entry, "cfg", None) or {}).get("dataset_path", "its data set")
            raise LmforgeError(
                f"lm-eval task '{hub[0]}' reads {dataset} from the Hugging Face Hub, and this machine is offline", where=where,
                fix=f"run it online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; lm-eval downloads the data once), "
                    f"or use a task that ships with lmforge: {', '.join(local_task_names())}")
    for task in tasks:
        entry = manager.task_index.get(task)
        for name in _data_files(getattr(entry, "cfg", None) or {}):
            if not Path(name).exists():
                raise LmforgeError(f"lm-eval task '{task}' reads {name}, which is not here", where=str(getattr(entry, "yaml_path", task)),
                                   fix="run lmforge from the repository root (the task's paths are relative to it)")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, batch_size: int = 8, limit: int | float | None = None,
                seed: int = 42, num_fewshot: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """lm-eval's scores of ``model`` on ``tasks``: {"results": {task: {metric: value, metric_stderr: ...}},
    "samples": {task: [per-document records]}, "configs": {task: settings}, "n-samples": ...}."""
    manager = check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # lm-eval says at WARNING that a model object (not a name) skips its own loading: that is the point here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        hf_logger.setLevel(level)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          log_samples=True, bootstrap_iters=1000)
    if out is None:  # not rank 0 of a distributed run
        return {}
    return {"results": out["results"], "samples": out.get("samples", {}), "configs": out.get("configs", {}),
            "n-samples": out.get("n-samples", {}), "versions": out.get("versions", {})}


def headline(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per task, each metric as ``{"value": v, "stderr": s}`` on lm-eval's scale (0-1), filters in the name
    (``exact_match,strict-match``), lm-eval's alias key dropped."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len", "sample_count") or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt in ("none", "") else f"{metric},{filt}"
            row[name] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        out[task] = row
    return out
