"""Imports run one way, layer by layer, with no cycles (DESIGN.md, "Layout").

Every ``import`` statement of every Python file in the repo is read with ``ast`` (inside functions
too: an import inside a function that closes a cycle is still a cycle), mapped to the repo file it
names, and checked:

- a file imports only from its own layer or a lower one:
  shared helpers -> model -> LoRA -> dataset -> trainer -> tools and command-line programs;
- within a layer the imports form no cycle;
- no command in ``scripts/`` or ``dev/`` imports another command.
"""
import ast
import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (pattern, layer): the first matching pattern decides; a repo file that matches none fails the test,
# so a new file has to be placed in a layer on purpose.
LAYERS = [
    ("model/__init__.py", 0),
    ("model/common.py", 0),
    ("model/train_hook.py", 1),
    ("model/model.py", 1),
    ("model/loss_fused.py", 1),
    ("model/loss_chunked.py", 1),
    ("model/chat_template.py", 1),
    ("model/tokenizer.py", 1),
    ("model/model_lora.py", 2),
    ("model/lora_*.py", 2),
    ("model/lora_variants/*.py", 2),
    ("model/hf_format.py", 2),
    ("model/minimind_format.py", 2),
    ("model/engine.py", 2),
    ("dataset/*.py", 3),
    ("dataset/demo/*.py", 3),
    ("trainer/*.py", 4),
    ("tools/*.py", 5),
    ("scripts/*.py", 5),
    ("dev/*.py", 5),
    ("eval_llm.py", 5),
]
LAYER_NAMES = ["shared helpers", "model", "LoRA", "dataset", "trainer", "tools and CLIs"]
COMMAND_DIRS = ("scripts", "dev")


def repo_files() -> list[str]:
    skip = {"tests", "out", ".git"}
    files = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in skip or any(p.startswith(".") for p in rel.parts):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def layer_of(rel: str) -> int | None:
    for pattern, layer in LAYERS:
        if fnmatch.fnmatchcase(rel, pattern):
            return layer
    return None


def module_file(name: str) -> str | None:
    """The repo file a dotted module name refers to (``model.model_lora`` -> model/model_lora.py)."""
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(ROOT).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(ROOT).as_posix()
    return None


def imported_files(rel: str) -> set[str]:
    """Repo files imported anywhere in ``rel`` (top level and inside functions)."""
    tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"), filename=rel)
    package = rel.rsplit("/", 1)[0].replace("/", ".") if "/" in rel else ""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in parent + ([base] if base else []) if p)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = module_file(name) if name else None
            if target is not None and target != rel:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {rel: imported_files(rel) for rel in repo_files()}


def test_every_file_has_a_layer():
    unplaced = [rel for rel in repo_files() if layer_of(rel) is None]
    assert not unplaced, f"files with no layer in tests/test_imports.py::LAYERS: {unplaced}"


def test_imports_never_go_up_a_layer():
    wrong = []
    for rel, targets in import_graph().items():
        for target in sorted(targets):
            lo, hi = layer_of(rel), layer_of(target)
            if lo is not None and hi is not None and hi > lo:
                wrong.append(f"{rel} ({LAYER_NAMES[lo]}) imports {target} ({LAYER_NAMES[hi]})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_command_imports_another():
    wrong = []
    for rel, targets in import_graph().items():
        if rel.split("/")[0] not in COMMAND_DIRS:
            continue
        wrong += [f"{rel} imports {t}" for t in sorted(targets) if t.split("/")[0] in COMMAND_DIRS]
    assert not wrong, "commands importing commands:\n" + "\n".join(wrong)


@pytest.mark.parametrize("rel, target", [("model/model.py", "model/engine.py"),
                                         ("model/model_lora.py", "model/lora_variants/__init__.py")])
def test_checker_sees_a_wrong_way_import(rel, target, monkeypatch):
    """The walk itself works: a planted upward or circular import is found."""
    graph = import_graph()
    graph[rel] = graph[rel] | {target}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError):
        test_imports_never_go_up_a_layer()
        test_no_import_cycles()
