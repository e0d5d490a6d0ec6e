"""One rank of `lmforge train` with every rank on the first GPU over gloo (bench/gpu_check.py's 2-rank rows).

torchrun starts two of these on a machine with one GPU. lmforge puts rank r on cuda:LOCAL_RANK and uses NCCL,
which refuses two ranks on one device ("Duplicate GPU detected"); gloo moves CUDA tensors through the host for
DDP's all-reduce and FSDP2's all-gather / reduce-scatter, so both ranks can share cuda:0. Only this bench runner
does that: it is a way to run lmforge's multi-rank code (data sharding, gradient sync, sharded saving) on one
GPU, not how anyone should train. Timings of these rows measure gloo, not NCCL.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

_init_process_group = dist.init_process_group


def _gloo_init(backend: str | None = None, *args: object, **kwargs: object) -> None:
    kwargs.pop("device_id", None)  # NCCL's eager per-device init; gloo takes none
    _init_process_group("gloo", *args, **kwargs)


if __name__ == "__main__":
    os.environ["LOCAL_RANK"] = "0"  # both ranks on cuda:0 (RANK and WORLD_SIZE stay torchrun's)
    dist.init_process_group = _gloo_init
    from lmforge.cli import main

    sys.exit(main(sys.argv[1:]))
