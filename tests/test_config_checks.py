"""Mistakes caught before any weights load: cross-key checks naming file:line, warnings, `validate` reading the
data files, and `train`/`pretrain` preparing data (and windows) before the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ARITHMETIC, tiny_config, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError


def line_of(path: Path, key: str) -> str:
    """`file:line` of a top-level key in a written config."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith(f"{key}:"):
            return f"{path}:{number}"
    raise AssertionError(f"{key} not in {path}")


@pytest.fixture()
def base(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> dict:
    return tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=4)


CONTRADICTIONS = [
    ({"adapter": "qlora"}, "adapter", "not quantized", "load_in_4bit: true"),
    ({"adapter": None, "load_in_4bit": True}, "load_in_4bit", "cannot be fully fine-tuned", "adapter: qlora"),
    ({"unfrozen_parameters": ["lm_head"], "lora_model_dir": "adapter"}, "unfrozen_parameters", "the loaded adapter fixes",
     "remove unfrozen_parameters"),
    ({"early_stopping_patience": 2}, "early_stopping_patience", "no eval split", "val_set_size"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end", "no eval split", "test_datasets"),
    ({"val_set_size": 4, "test_datasets": [{"path": "PLACEHOLDER", "type": "alpaca"}]}, "val_set_size", "not both", "remove one"),
    # axolotl's GLM-4.7-Flash FSDP examples: each trained a step, then stopped (one at its first checkpoint)
    ({"adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": True, "fsdp_config": {"fsdp_version": 2}},
     "quantize_moe_experts", "first save", "drop fsdp_config"),
    ({"load_in_8bit": True, "fsdp_config": {"fsdp_version": 2}}, "load_in_8bit", "FSDP2's shards drop it", "load_in_4bit: true"),
]


@pytest.mark.parametrize("extra, key, problem, fix", CONTRADICTIONS, ids=[c[1] + "-" + c[2].split()[0] for c in CONTRADICTIONS])
def test_contradictions_name_the_key_line(extra: dict, key: str, problem: str, fix: str, base: dict, alpaca_file: Path,
                                          tmp_path: Path) -> None:
    extra = json.loads(json.dumps(extra).replace("PLACEHOLDER", str(alpaca_file)))
    path = write_config(tmp_path / "c.yml", {**base, **extra})
    with pytest.raises(LmforgeError) as err:
        load_config(str(path))
    assert err.value.where == line_of(path, key) and problem in err.value.message and fix in (err.value.fix or "")


def test_fp16_without_cuda_runs_as_cpu_autocast_with_a_notice(base: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", {**base, "fp16": True, "bf16": False})
    cfg = load_config(str(path), gpu=False)
    assert cfg.speed.fp16 and any(n.key == "fp16" and "CPU autocast" in n.text for n in cfg.notices)


PRETRAINING_CONTRADICTIONS = [
    ({"adapter": "lora"}, "adapter", "a new model's weights are random"),
    ({"val_set_size": 10}, "val_set_size", "is a row count"),
    ({"objective": "mlm", "adapter": "lora", "model_config": None, "base_model": "BASE"}, "adapter", "objective: mlm"),
]


@pytest.mark.parametrize("extra, key, problem", PRETRAINING_CONTRADICTIONS, ids=["adapter-on-new-model", "val-rows", "mlm-adapter"])
def test_pretraining_contradictions(extra: dict, key: str, problem: str, tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    config = {"model_config": {"architecture": "llama", "preset": "tiny"}, "tokenizer_config": str(tiny_model_dir),
              "pretraining_dataset": [str(alpaca_file)], "output_dir": str(tmp_path / "out"), **extra}
    if config.get("base_model") == "BASE":
        config["base_model"] = str(tiny_model_dir)
    config = {k: v for k, v in config.items() if v is not None}
    path = write_config(tmp_path / "c.yml", config)
    with pytest.raises(LmforgeError, match=problem) as err:
        load_config(str(path))
    assert err.value.where == line_of(path, key)


def test_pretraining_datasets_must_be_raw_text(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", {"model_config": {"architecture": "llama", "preset": "tiny"},
                                             "tokenizer_config": str(tiny_model_dir),
                                             "datasets": [{"path": str(alpaca_file), "type": "alpaca"}]})
    with pytest.raises(LmforgeError, match="pretraining reads raw text") as err:
        load_config(str(path))
    type_line = next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if "type: alpaca" in line)
    assert err.value.where == f"{path}:{type_line}"  # the entry's `type:` line


def test_warnings_name_the_key_and_what_to_change(base: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", {**base, "adapter": None, "warmup_steps": 4, "bnb_4bit_quant_type": "fp4",
                                             "eval_steps": 2})
    warnings = load_config(str(path)).warnings
    assert len(warnings) == 4, warnings
    lora, four_bit, evals, warmup = warnings
    assert lora.startswith(line_of(path, "lora_r")) and "no effect without an adapter" in lora
    assert four_bit.startswith(line_of(path, "bnb_4bit_quant_type")) and "load_in_4bit" in four_bit
    assert evals.startswith(line_of(path, "eval_steps")) and "no eval split" in evals
    assert warmup.startswith(line_of(path, "warmup_steps")) and "the whole run of 4" in warmup and "lower warmup_steps below 4" in warmup


def test_validate_prints_warnings_and_reads_the_data(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "c.yml", {**base, "warmup_steps": 10})
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {line_of(path, 'warmup_steps')}: warm-up (warmup_steps: 10)" in err
    assert "20 rows, fields checked" in err and "valid" in err
    assert "base_model:" not in capsys.readouterr().out  # the resolved config only with --print-config


def test_validate_prints_the_resolved_config_only_when_asked(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "c.yml", base)
    assert main(["validate", str(path)]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and len(quiet.err.splitlines()) <= 4, quiet  # the checks and a one-line verdict
    assert quiet.err.splitlines()[-1] == f"# {path}: valid (--print-config shows it resolved)"
    assert main(["validate", str(path), "--print-config"]) == 0
    shown = capsys.readouterr()
    assert shown.out.startswith(f"base_model: {base['base_model']}\n") and "lora_r: 4" in shown.out
    assert len(shown.out.splitlines()) > 100 and shown.err.splitlines()[-1] == f"# {path}: valid"


def test_warmup_over_the_computed_run_is_warned_at_train_time(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lmforge.recipes.finetune import run_train

    # No max_steps: the step count is known only once the data is (20 rows / 4 per batch = 5 steps).
    cfg = {**base, "max_steps": None, "num_epochs": 1, "warmup_steps": 6}
    run_train(load_config(str(write_config(tmp_path / "c.yml", {k: v for k, v in cfg.items() if v is not None}))))
    assert "warning: warm-up (warmup_steps: 6) lasts 6 steps, the whole run of 5" in capsys.readouterr().out


# ----------------------------------------------------------------------------- data before weights


def _no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything loads or builds model weights."""
    import lmforge.models.setup as setup

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model weights were loaded before the data was checked")

    monkeypatch.setattr(setup, "load_model", refuse)
    monkeypatch.setattr(setup, "training_model", refuse)


BAD_DATA = [
    ("broken.jsonl", lambda p: p.write_text(json.dumps(ARITHMETIC[0]) + "\n{\"instruction\": \"x\",\n"),
     {"type": "alpaca"}, {}, ["broken.jsonl:2", "malformed JSON line"]),
    ("qa.csv", lambda p: p.write_text("question,reply\nwhat is 1 plus 1 ?,2\n"),
     {"type": {"field_instruction": "question", "field_output": "answer"}}, {}, ["qa.csv:row 1", "'answer' is missing", "question, reply"]),
    ("chat.jsonl", lambda p: p.write_text(json.dumps({"messages": []}) + "\n"),
     {"type": "chat_template"}, {"chat_template": "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"}, ["chat.jsonl:1", "holds no turns"]),
]


@pytest.mark.parametrize("name, write, spec, extra, needles", BAD_DATA, ids=["broken-json-line", "csv-missing-column", "chat-no-turns"])
def test_bad_data_fails_in_validate_and_before_weights_in_train(name: str, write: object, spec: dict, extra: dict, needles: list[str],
                                                                base: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / name
    write(data)
    path = write_config(tmp_path / "c.yml", {**base, **extra, "datasets": [{"path": str(data), **spec}]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err
    _no_weights(monkeypatch)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles) and "weights were loaded" not in err, err


@pytest.mark.parametrize("content", ["instruction,input,output\n", ""], ids=["header-only", "zero-bytes"])
def test_a_csv_with_no_rows_is_one_line_in_validate_preprocess_and_train(content: str, base: dict, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "train.csv"
    data.write_text(content)
    path = write_config(tmp_path / "c.yml", {**base, "datasets": [{"path": str(data), "type": "alpaca"}]})
    _no_weights(monkeypatch)
    for command in ("validate", "preprocess", "train"):
        assert main([command, str(path)]) == 2, command
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {data}: the file has no rows (add rows to it below its header line, or remove it from the config)"], \
            (command, captured.err)
        assert "Traceback" not in captured.err


def test_validate_refuses_a_sequence_len_that_leaves_no_response_token(base: dict, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`validate` runs train's own check (prepare's), so both refuse sequence_len 4 with the same line."""
    from lmforge.recipes.finetune import run_train

    path = write_config(tmp_path / "c.yml", {**base, "sequence_len": 4})
    assert main(["validate", str(path)]) == 2
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    with pytest.raises(LmforgeError) as err:
        run_train(load_config(str(path)))
    assert refused == [f"error: {err.value.format()}"] and "raise sequence_len above 4" in refused[0]
    assert main(["validate", str(write_config(tmp_path / "ok.yml", base))]) == 0
    assert "tokens: 20 train / 0 eval examples at sequence_len 64" in capsys.readouterr().err


def test_validate_leaves_a_hub_dataset_to_training(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path / "c.yml", {**base, "datasets": [{"path": "someone/a-hub-dataset", "type": "alpaca"}]})
    assert main(["validate", str(path)]) == 0  # nothing is downloaded to check its tokens
    assert "tokens: checked when training (a Hub dataset is read then, not here)" in capsys.readouterr().err


def test_sequence_len_too_short_for_every_example_fails_before_weights(base: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes.finetune import run_train

    _no_weights(monkeypatch)
    with pytest.raises(LmforgeError, match="no usable examples") as err:
        run_train(load_config(str(write_config(tmp_path / "c.yml", {**base, "sequence_len": 4}))))
    assert err.value.where == "sequence_len" and "raise sequence_len above 4" in err.value.fix


def test_pretrain_makes_its_windows_before_the_weights(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes.pretrain import run_pretrain

    text = tmp_path / "t.txt"
    text.write_text("the cat is red . " * 20)
    config = {"model_config": {"architecture": "llama", "preset": "tiny"}, "tokenizer_config": str(tiny_model_dir),
              "pretraining_dataset": [str(text)], "sequence_len": 512, "output_dir": str(tmp_path / "out")}
    import lmforge.recipes.pretrain as pretrain

    _no_weights(monkeypatch)
    monkeypatch.setattr(pretrain, "build_model", lambda *a, **k: pytest.fail("a model was built before the windows"))
    with pytest.raises(LmforgeError, match="window of 513 tokens fits"):
        run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))


def test_validate_checks_pretraining_columns(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = write_jsonl(tmp_path / "docs.jsonl", [{"body": "the cat"}])
    path = write_config(tmp_path / "c.yml", {"model_config": {"architecture": "llama", "preset": "tiny"},
                                             "tokenizer_config": str(tiny_model_dir), "pretraining_dataset": [str(rows)]})
    assert main(["validate", str(path)]) == 2
    assert "docs.jsonl:1: column 'text' is missing (set text_column to one of: body)" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_data_file_reads_clean(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `lmforge validate` reads: every row of every shipped example's data parses, with the fields its type needs."""
    from lmforge.data.check import check_data_files

    monkeypatch.chdir(path.parents[2])
    lines = check_data_files(load_config(str(path)))
    assert lines and all("rows" in line or "file(s)" in line for line in lines), lines


def test_do_causal_lm_eval_without_an_eval_split_is_a_warning_naming_its_line(base: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yml", {**base, "do_causal_lm_eval": True})
    warnings = [w for w in load_config(str(path)).warnings if "do_causal_lm_eval" in w]
    assert len(warnings) == 1 and warnings[0].startswith(line_of(path, "do_causal_lm_eval")) and "no eval split" in warnings[0]
