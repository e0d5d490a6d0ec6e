"""GRPO learning check on this CPU: examples/smollm2-135m/grpo-gsm8k.yml (SmolLM2-135M-Instruct, LoRA, GSM8K prompts,
correctness + format rewards) run as a measured child process; prints the held-out reward before and after, the
per-function rewards, and the generation / training time split, from the run's summary.json.

    python bench/grpo_gsm8k.py [--steps 20] [--threads 1] [--out outputs/bench-grpo] [--set trl.temperature=1.0 ...]

The config is copied beside a copy of rewards.py in --out (reward functions must sit beside their config) with
max_steps, output_dir and the --set overrides (dotted keys, YAML values) changed. --threads 1 is the fast choice on
a CPU shared with other jobs: two OpenMP threads that wait on each other's barrier while the cores are busy run many
times slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, log, machine_description, run_measured  # noqa: E402

EXAMPLE = REPO / "examples" / "smollm2-135m" / "grpo-gsm8k.yml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of the training process (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-grpo", help="work folder")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, dotted for nested keys (trl.num_generations=8, lora_model_dir=...)")
    args = parser.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE.parent / "rewards.py", out / "rewards.py")
    config = yaml.safe_load(EXAMPLE.read_text())
    config["trl"]["reward_funcs"] = [f"{out / 'rewards.py'}:{name.rpartition(':')[2]}" for name in config["trl"]["reward_funcs"]]
    for entry in config["datasets"]:
        entry["path"] = str(REPO / entry["path"])
        entry["type"] = f"{out / 'rewards.py'}:{entry['type'].rpartition(':')[2]}"
    config.update(max_steps=args.steps, output_dir=str(out / "run"), save_steps=None)
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    (out / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    env = child_env(args.threads)
    env["PYTHONPATH"] = str(REPO)
    log(f"lmforge train {out / 'config.yml'} ({args.steps} steps, {args.threads} thread(s)); log: {out / 'train.log'}")
    result = run_measured([sys.executable, "-m", "lmforge", "train", str(out / "config.yml")], out / "train.log", env,
                          args.timeout, cwd=out)
    if result["rc"] != 0:
        log(f"the run failed (exit {result['rc']}); see {out / 'train.log'}")
        return 1
    summary = json.loads((out / "run" / "summary.json").read_text())
    rows = [("held-out reward (weighted: correct + 0.5 x format)", "eval_reward")]
    rows += [(f"held-out {name}", f"eval_rewards/{name}/mean") for name in ("gsm8k_correct", "gsm8k_format")]
    print(f"GRPO, SmolLM2-135M-Instruct LoRA, GSM8K, {summary['steps']} steps, {len(config['trl']['reward_funcs'])} rewards; "
          f"{summary['eval_prompts']} held-out prompts answered greedily")
    print(f"{'':52} {'step 0':>8} {'step ' + str(summary['steps']):>8}")
    for label, key in rows:
        print(f"{label:52} {summary[f'{key}_start']:>8.3f} {summary[f'{key}_end']:>8.3f}")
    print(f"train reward at the last log: {summary.get('last_reward', float('nan')):.3f}; "
          f"kl {summary.get('last_kl', float('nan')):.4f}; completion length {summary.get('last_completions/mean_length', 0):.0f}")
    print(f"time: {summary['wall_seconds']:.0f}s in all, generation {summary['generation_seconds']:.0f}s, "
          f"training {summary['training_seconds']:.0f}s; peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"overrides: {' '.join(args.set) or 'none'}; load average at the end: {os.getloadavg()}")
    print(f"machine: {json.dumps(machine_description())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
