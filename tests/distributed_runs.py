"""Run several training configs one after another in one torchrun launch (tests/test_distributed.py).

Each rank runs `run_train` (or `run_pretrain`) for every config given, as `lmforge train` does under torchrun; the
process group is made once here, so a launch (a few seconds of imports and start-up per rank)
serves several runs. Usage: torchrun --nproc_per_node 2 tests/distributed_runs.py A.yml B.yml ...
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from lmforge.config import load_config
from lmforge.recipes.pretrain import run_pretrain
from lmforge.recipes.finetune import run_train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for path in sys.argv[1:]:
            cfg = load_config(path)
            run_pretrain(cfg) if cfg.is_pretraining else run_train(cfg)
    finally:
        dist.destroy_process_group()
