"""Training checkpoints: written atomically (lmforge.atomic), verified by a manifest, resumed bit-identically.

A training checkpoint (``checkpoint-<step>/``) holds the weights (adapter or full model, with
tokenizer and config, loadable like any output), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``
(python, numpy, torch RNG states), ``trainer_state.json`` (step, data position, histories, best
eval) and, written last, ``manifest.json`` with every file's size and SHA-256. A folder under
its final name is complete (it was renamed there after the manifest was written); a file
changed or lost later is caught by the manifest and named in the error.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmforge.atomic import atomic_dir, restore_swapped, write_json, write_text
from lmforge.hashing import file_sha256
from lmforge.errors import LmforgeError
from lmforge.models.adapters import save_weights

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
BEST = "best.safetensors"  # trainable weights of the best eval so far (load_best_model_at_end)
RNG_RANKS = "rng_ranks.pt"  # every rank's RNG states, when several ranks trained


def save_model_files(model: Any, tokenizer: Any, config: dict[str, Any], folder: Path) -> None:
    """Weights (adapter or full model, safetensors), tokenizer and the resolved config."""
    save_weights(model, folder)
    tokenizer.save_pretrained(folder)
    write_text(folder / "config.yml", yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------- training checkpoints


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> str | None:
    """Restore the RNG states; returns a note when the checkpoint's GPUs and the visible ones differ in number.

    Only the states of GPUs present are restored (torch.cuda.set_rng_state_all fails on a missing one):
    a run resumed on fewer GPUs continues, and only the dropout masks of the GPUs gone cannot repeat.
    """
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    if not (saved and torch.cuda.is_available()):
        return None
    visible = torch.cuda.device_count()
    for index, device_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(device_state, index)
    if len(saved) == visible:
        return None
    return (f"the checkpoint holds CUDA RNG states of {len(saved)} GPUs and {visible} visible now: restored those of "
            f"the first {min(len(saved), visible)} (random draws on the others differ from an uninterrupted run)")


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    write_json(folder / MANIFEST, {"format": 1, "files": entries})


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (small for an adapter)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def assert_finite(model: torch.nn.Module, step: int) -> None:
    """Refuse to save NaN/inf weights."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param).all()):
            raise LmforgeError(f"weight {name} is not finite at step {step}; not saving it", where="training",
                               fix="lower learning_rate or set max_grad_norm; resume from the last checkpoint")


def save_checkpoint(
    folder: Path,
    *,
    model: Any,
    tokenizer: Any,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
    weights: Callable[[Path], None] | None = None,
    rng_ranks: list[Any] | None = None,
) -> Path:
    """Write one complete checkpoint atomically (temporary folder, manifest last, then rename).

    Without an optimizer (save_only_model) it holds the weights only and says so in its state.
    Under sharding (lmforge.train.distributed) `weights` writes the weights and optimizer state
    instead (every rank takes part), and `rng_ranks` holds every rank's RNG states.
    """

    def write(tmp: Path) -> None:
        if weights is None:
            save_model_files(model, tokenizer, config, tmp)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        else:
            weights(tmp)
            tokenizer.save_pretrained(tmp)
            write_text(tmp / "config.yml", yaml.safe_dump(config, sort_keys=False))
        if optimizer is None:
            state["model_only"] = True
        else:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            if rng_ranks is not None:
                torch.save(rng_ranks, tmp / RNG_RANKS)
        if best is not None:
            from safetensors.torch import save_file

            save_file(best, str(tmp / BEST))
        write_json(tmp / STATE, state)
        _write_manifest(tmp)

    return atomic_dir(folder, write)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders in output_dir, newest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the deleted folders."""
    old = list_checkpoints(output_dir)[keep:]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def remove_partial_writes(output_dir: Path) -> None:
    """Temporary folders left by a process killed mid-write (never loadable, never needed), and a
    checkpoint renamed aside by a kill in the middle of replacing it (put back)."""
    for tmp in Path(output_dir).glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in Path(output_dir).glob(".publish-tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    restore_swapped(output_dir)


def _corrupt(folder: Path, name: str, problem: str) -> LmforgeError:
    return LmforgeError(f"checkpoint file {name} {problem}", where=str(folder / name),
                        fix=f"resume from another checkpoint, or delete {folder}")


def _other_model(folder: Path, name: str, exc: Exception) -> LmforgeError:
    first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
    return LmforgeError(f"checkpoint file {name} was saved from another model or adapter ({first[:200]})",
                        where=str(folder / name),
                        fix="resume with the base_model and adapter settings it was trained with, or start a fresh output_dir")


def verify_checkpoint(folder: Path) -> None:
    """Raise an LmforgeError naming the first missing or altered file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise _corrupt(folder, MANIFEST, "is missing (the checkpoint was never completed)")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(folder, MANIFEST, f"is unreadable ({exc})") from exc
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise _corrupt(folder, name, "is missing")
        if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise _corrupt(folder, name, "is corrupt (size or checksum differs from manifest.json)")


def resolve_resume(setting: str | None, output_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """`auto`: the newest checkpoint that verifies (older ones are tried in turn); a path: that one, verified."""
    if not setting:
        return None
    if setting == "auto":
        for folder in list_checkpoints(output_dir):
            try:
                verify_checkpoint(folder)
                return folder
            except LmforgeError as exc:
                say(f"skipping {folder.name}: {exc.format()}")
        say(f"no valid checkpoint in {output_dir}; starting from step 0")
        return None
    folder = Path(setting).expanduser()
    if not folder.is_dir():
        raise LmforgeError(f"checkpoint folder does not exist: {setting}", where="resume_from_checkpoint",
                           fix="give a checkpoint-<step> folder, or 'auto' for the newest in output_dir")
    verify_checkpoint(folder)
    return folder


def _read(folder: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(folder / name)
    except LmforgeError:
        raise
    except Exception as exc:  # any decoding failure of a damaged file
        raise _corrupt(folder, name, f"cannot be read ({type(exc).__name__}: {exc})") from exc


def _load_weights(model: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        weights = _read(folder, "adapter_model.safetensors", lambda p: load_file(str(p)))
        try:
            set_peft_model_state_dict(model, weights)
        except RuntimeError as exc:  # a shape differs: an adapter of another model or another lora_r
            raise _other_model(folder, "adapter_model.safetensors", exc) from exc
        return
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise _corrupt(folder, "model.safetensors", "is missing")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(_read(folder, shard.name, lambda p: load_file(str(p))))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a shape differs: the checkpoint of another model
        raise _other_model(folder, shards[0].name, exc) from exc
    # A tied weight (lm_head sharing the embedding) is saved once under the other name.
    saved_ptrs = {t.data_ptr() for n, t in model.state_dict().items() if n in weights}
    untied = [n for n in missing if model.state_dict()[n].data_ptr() not in saved_ptrs]
    if untied or unexpected:
        raise _corrupt(folder, shards[0].name, f"does not match the model (missing {untied[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    weights: Callable[[Path], None] | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; returns trainer_state.json.

    `weights` reads sharded weights and optimizer state instead (see save_checkpoint); under several
    ranks each takes its own RNG states when the checkpoint was saved by as many ranks.
    """
    folder = Path(folder)
    state = _read(folder, STATE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if state.get("model_only"):
        raise LmforgeError(f"{folder.name} was saved with save_only_model: it holds no optimizer, schedule or RNG state, "
                           "so a run cannot resume from it", where=str(folder),
                           fix="start a new run (its weights are in the folder), or set save_only_model: false for resumable checkpoints")
    if weights is None:
        _load_weights(model, folder)
        optimizer.load_state_dict(_read(folder, "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)))
    else:
        weights(folder)
    scheduler.load_state_dict(_read(folder, "scheduler.pt", lambda p: torch.load(p, weights_only=True)))
    ranks = _read(folder, RNG_RANKS, lambda p: torch.load(p, weights_only=True)) if (folder / RNG_RANKS).is_file() else None
    if ranks is not None and len(ranks) == world_size:
        note = set_rng_state(ranks[rank])
    else:
        note = set_rng_state(_read(folder, "rng.pt", lambda p: torch.load(p, weights_only=True)))
    if note:
        state["rng_note"] = note
    return state


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    return _read(folder, BEST, lambda p: load_file(str(p))) if (folder / BEST).is_file() else None
