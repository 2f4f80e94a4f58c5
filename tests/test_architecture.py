"""The layering of ``ARCHITECTURE.md`` (and ``../shared/DESIGN.md``), held by the import graph.

Every import counts, those inside functions included: a lazy import still couples two modules,
it only hides the coupling until run time. The checker reads the source with ``ast`` (nothing
is imported), so it also runs on a modified copy of the package, which is how the tests below
show that it catches a forbidden import and a cycle.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medtransfer"

# Layers by module prefix: what each must not import (a prefix covers its submodules).
ABOVE_TRAINING = (
    "medtransfer.evaluation",
    "medtransfer.export",
    "medtransfer.lean_export",  # the Export layer's LiteRT / ONNX graphs
    "medtransfer.scoring",
)
INFERENCE = ("medtransfer.predictor",)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # Models know no Data and no Training: a model is built from a spec, not from files
    "medtransfer.models": (
        "medtransfer.data",
        "medtransfer.training",
        *ABOVE_TRAINING,
        *INFERENCE,
    ),
    # Data knows no Training and nothing downstream (it may use the model's own resize)
    "medtransfer.data": ("medtransfer.training", *ABOVE_TRAINING, *INFERENCE),
    "medtransfer.training": (*ABOVE_TRAINING, *INFERENCE),
    # Evaluation, Export and Scoring know no Training: they read runs through rundir
    "medtransfer.predictor": ("medtransfer.training", *ABOVE_TRAINING),
    "medtransfer.evaluation": ("medtransfer.training", "medtransfer.export", "medtransfer.scoring"),
    "medtransfer.export": ("medtransfer.training", "medtransfer.scoring"),
    "medtransfer.lean_export": ("medtransfer.training", "medtransfer.scoring"),
    "medtransfer.scoring": ("medtransfer.training", "medtransfer.evaluation", "medtransfer.export"),
    "medtransfer.ray_scoring": (
        "medtransfer.training",
        "medtransfer.evaluation",
        "medtransfer.export",
    ),
    "medtransfer.folder_pool": ("medtransfer.training", "medtransfer.evaluation"),
    "medtransfer.folder_output": ("medtransfer.training", "medtransfer.evaluation"),
    "medtransfer.inspect": ("medtransfer.training", "medtransfer.evaluation"),
    # PACS input and reports are Scoring: an export is read through its layout, not export.py
    "medtransfer.pacs": (
        "medtransfer.training",
        "medtransfer.evaluation",
        "medtransfer.export",
        *INFERENCE,
    ),
}
# The lowest layers, by what they may import at all.
ONLY: dict[str, tuple[str, ...]] = {
    # IO knows no Data and no Models: decode workers import it without TensorFlow
    "medtransfer.io": ("medtransfer.io", "medtransfer.errors", "medtransfer.privacy"),
    "medtransfer.rundir": ("medtransfer.errors", "medtransfer.atomic"),
    "medtransfer.errors": (),
    "medtransfer.atomic": (),
    "medtransfer.privacy": (),
    # scope rules are plain comparisons of a header with a training profile
    "medtransfer.scope": (),
    "medtransfer.export_layout": ("medtransfer.rundir",),
    # drift monitoring reads tables and JSON: no model, no TensorFlow, nothing of the pipeline
    "medtransfer.monitoring": (
        "medtransfer.monitoring",
        "medtransfer.rundir",
        "medtransfer.export_layout",
        "medtransfer.atomic",
        "medtransfer.errors",
        "medtransfer.scope",  # the OOD percentile, as scoring reads it
    ),
    # the spec validates names against registries and data tables, nothing more
    "medtransfer.spec": (
        "medtransfer.errors",
        "medtransfer.rundir",
        "medtransfer.io.dicom",
        "medtransfer.models.backbones",
        "medtransfer.models.adaptation_methods",
        "medtransfer.data.augment_presets",
    ),
}
# Only the command line may know the command line.
CLI = ("medtransfer.cli", "medtransfer.__main__")
# Exceptions to FORBIDDEN: data may resize as the model does (the cache's guarantee).
ALLOWED = {("medtransfer.data", "medtransfer.models.inputs")}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> Iterator[tuple[str, str, int]]:
    """(importer, imported module, line) for every medtransfer import under ``root``."""
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # "from medtransfer import atomic" imports the module medtransfer.atomic
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "medtransfer" and target != name:
                    yield name, target, node.lineno


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks a layering rule, and every import cycle, as readable lines."""
    found, graph = [], {}
    for source, target, line in imports(root):
        graph.setdefault(source, set()).add(target)
        where = f"{source} (line {line}) imports {target}"
        for layer, banned in FORBIDDEN.items():
            excepted = any(_within(target, ok) for lay, ok in ALLOWED if _within(source, lay))
            if _within(source, layer) and any(_within(target, b) for b in banned) and not excepted:
                found.append(f"{where}: {layer} must not import {', '.join(banned)}")
        for layer, allowed in ONLY.items():
            if _within(source, layer) and not any(_within(target, a) for a in allowed):
                found.append(f"{where}: {layer} may import only {', '.join(allowed) or 'nothing'}")
        if any(_within(target, c) for c in CLI) and not any(_within(source, c) for c in CLI):
            found.append(f"{where}: the core knows no CLI")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append([*sorted(group), sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_keeps_its_layers_and_has_no_import_cycles():
    assert violations(PACKAGE) == []


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "medtransfer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_an_import_from_evaluation_into_training_is_caught(tmp_path):
    copy = _copy(tmp_path)
    report = copy / "evaluation" / "report.py"
    report.write_text(report.read_text() + "\n\ndef _again():\n    from ..training import run\n")
    found = violations(copy)
    assert len(found) == 1, found
    assert found[0].startswith("medtransfer.evaluation.report (line")
    assert "imports medtransfer.training.run: medtransfer.evaluation must not import" in found[0]


def test_an_import_cycle_and_a_low_layer_reaching_up_are_caught(tmp_path):
    copy = _copy(tmp_path)
    rundir = copy / "rundir.py"
    rundir.write_text(rundir.read_text() + "\nfrom medtransfer.spec import Spec  # noqa\n")
    found = violations(copy)
    assert any("medtransfer.rundir may import only" in line for line in found), found
    assert "import cycle: medtransfer.rundir -> medtransfer.spec -> medtransfer.rundir" in found


def test_the_core_may_not_import_the_cli(tmp_path):
    copy = _copy(tmp_path)
    scoring = copy / "scoring.py"
    scoring.write_text(scoring.read_text() + "\nfrom medtransfer.cli import main  # noqa\n")
    assert any(line.endswith("the core knows no CLI") for line in violations(copy))


# --- small functions --------------------------------------------------------------------------

MAX_LINES = 60
# Functions allowed to be longer, each with the reason.
LONG_FUNCTIONS: dict[str, str] = {}


def function_lengths(root: Path) -> Iterator[tuple[str, int]]:
    """(module:qualified name, lines of code without its docstring) for every function."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = module_name(root, path)
        yield from _lengths(tree, module + ":")


def _lengths(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                lines = child.end_lineno - child.lineno + 1
                body = child.body
                if (
                    body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                ):
                    lines -= body[0].end_lineno - body[0].lineno + 1
                yield name, lines
            yield from _lengths(child, name + ".")


def test_no_function_is_longer_than_60_lines_without_a_stated_reason():
    long = {name: n for name, n in function_lengths(PACKAGE) if n > MAX_LINES}
    assert {name: n for name, n in long.items() if name not in LONG_FUNCTIONS} == {}
    assert set(LONG_FUNCTIONS) <= set(long), "an allowed long function got short: drop it"


def test_the_length_check_counts_code_not_docstrings(tmp_path):
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    doc = '    """' + "\n".join(["why"] * 30) + '"""\n'
    source.write_text(
        "def f():\n" + doc + "    x = 1\n" * 3 + "\n\nclass C:\n    def g(self):\n        pass\n"
    )
    assert dict(function_lengths(source.parent)) == {"pkg.mod:f": 4, "pkg.mod:C.g": 2}


@pytest.mark.parametrize(
    "module", ["evaluation", "export.py", "lean_export.py", "scoring.py", "predictor.py"]
)
def test_readers_of_runs_reach_them_through_rundir(module):
    """No reader retypes the run directory's file names: they come from ``rundir``."""
    paths = (
        [PACKAGE / module] if module.endswith(".py") else sorted((PACKAGE / module).glob("*.py"))
    )
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for literal in ('"run.json"', '"model.keras"', '"spec.yaml"', '"manifest.csv"', '"run:"'):
            assert literal not in text, f"{path.name} retypes {literal}"
