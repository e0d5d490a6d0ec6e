"""The package's shape, read from its source: one loader per artifact, no import cycles, no private names
borrowed across modules (issue 22). Each test reads files only: no import of lmforge, no torch."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"

# The one function that reads a tokenizer and the one that puts a saved adapter on a model.
# models.load.config_tokenizer builds a config's tokenizer through load_tokenizer.
LOADERS = {("models/load.py", "load_tokenizer"), ("models/adapters.py", "load_adapter")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (module level or inside a function), not those under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported lmforge module, imported name or None) for one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names if alias.name in modules]
    base = node.module or ""
    if node.level:
        package = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            out.append((submodule, None))
        elif base in modules:
            out.append((base, alias.name))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """lmforge's import edges (module → modules it imports, at any level: a cycle through a lazy import is
    still two modules that need each other) and every `_private` name imported from another module."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for module, path in modules.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target, name in _targets(module, node, modules):
                if target == module:
                    continue
                edges[module].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{module} imports {name} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_the_package_has_no_import_cycles() -> None:
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_private_name_from_another() -> None:
    _, private = import_graph()
    assert private == []


def _loader_calls(path: Path) -> list[tuple[str, str]]:
    """(enclosing function, call) for each ``X.from_pretrained(...)`` where X names a tokenizer class or PeftModel."""
    found = []

    def walk(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inside = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "from_pretrained":
                receiver = ast.unparse(child.func.value)
                if "okenizer" in receiver or "Peft" in receiver:
                    found.append((function, f"{receiver}.from_pretrained"))
            walk(child, inside)

    walk(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return found


def test_tokenizers_and_adapters_load_in_one_function_each() -> None:
    outside = []
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for function, call in _loader_calls(path):
            if (rel, function) in LOADERS:
                seen.add((rel, function))
            else:
                outside.append(f"{rel}:{function}: {call}")
    assert outside == []
    assert seen == LOADERS  # the check would pass vacuously if the loaders moved or were renamed


def test_the_loader_search_sees_every_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    AutoTokenizer.from_pretrained('x')\n    transformers.AutoTokenizer.from_pretrained('x')\n"
                      "def g():\n    tokenizer_class.from_pretrained('x')\n    PeftModel.from_pretrained(m, 'x')\n"
                      "    AutoModelForCausalLM.from_pretrained('x')\n")
    assert [call for _, call in _loader_calls(sample)] == [
        "AutoTokenizer.from_pretrained", "transformers.AutoTokenizer.from_pretrained",
        "tokenizer_class.from_pretrained", "PeftModel.from_pretrained"]
