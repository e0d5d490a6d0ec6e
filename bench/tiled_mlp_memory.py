"""tiled_mlp's activation memory: bytes saved for backward and peak bytes alive during one step, tiled vs untiled.

A small Llama (random weights, built from config) runs one forward and backward per setting on one long sequence.
Two numbers per run, both from torch itself, so they mean the same on a CPU as on a GPU:

- saved: the bytes of every activation autograd keeps for backward (``saved_tensors_hooks``, weights left out,
  each storage counted once) -- what tiling removes from the MLP (it keeps only the MLP's input);
- peak: on CUDA, ``torch.cuda.max_memory_allocated`` above the weights; on CPU, the process's peak RSS growth over
  the step, measured in a fresh child process per setting (RSS only grows, so one process per number).

    .venv/bin/python bench/tiled_mlp_memory.py                     # seq 8192, hidden 512, intermediate 2048, 4 layers
    .venv/bin/python bench/tiled_mlp_memory.py --seq 16384 --shards 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one_run(seq: int, hidden: int, intermediate: int, layers: int, shards: int, checkpointing: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.tiled_mlp import tile_mlps

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shards > 1:
        tile_mlps(model, shards)
    ids = torch.randint(0, 1024, (1, seq), device=device)
    seen: set[int] = set()
    saved = [0]
    params = {p.data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            saved[0] += storage.nbytes()
        return tensor

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # the loss over hidden states, not the vocabulary head: the MLPs' share of the memory is what is measured
        hidden_states = model.model(input_ids=ids).last_hidden_state
        loss = hidden_states.float().pow(2).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"shards": shards, "checkpointing": checkpointing, "saved_mb": saved[0] / 2**20, "peak_mb": peak / 2**20,
            "seconds": seconds, "loss": float(loss), "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shards, checkpointing = json.loads(args.child)
        print(json.dumps(one_run(args.seq, args.hidden, args.intermediate, args.layers, shards, checkpointing)))
        return
    rows = []
    for shards, checkpointing in ((1, False), (args.shards, False), (1, True), (args.shards, True)):
        command = [sys.executable, __file__, "--seq", str(args.seq), "--hidden", str(args.hidden), "--intermediate",
                   str(args.intermediate), "--layers", str(args.layers), "--child", json.dumps([shards, checkpointing])]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, one sequence of "
          f"{args.seq} tokens, fp32, {rows[0]['device']}\n")
    print("| tiled_mlp | gradient_checkpointing | saved for backward (MB) | peak during the step (MB) | step (s) | loss |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        tiled = f"{row['shards']} slices" if row["shards"] > 1 else "off"
        print(f"| {tiled} | {row['checkpointing']} | {row['saved_mb']:.0f} | {row['peak_mb']:.0f} | {row['seconds']:.2f} "
              f"| {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
