"""The layout keeps its promises: imports run one way along the pipeline, and code outside
an operator's package never branches on the operator's name."""

from __future__ import annotations

import ast
from pathlib import Path

from attnbench.kernels import registry

ROOT = Path(__file__).resolve().parent.parent
# Pipeline order: a stage may import the stages before it, never those after it.
STAGES = ("plan", "measure", "check", "results", "report")


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported(path: Path, tree: ast.AST) -> set[str]:
    """Absolute dotted names of everything a module imports."""
    package = ".".join(("attnbench",) + path.relative_to(ROOT).parent.parts)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_kernels_never_import_the_tuner():
    for path, tree in _modules(ROOT / "kernels"):
        bad = sorted(n for n in _imported(path, tree) if n.startswith("attnbench.tuner"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tuner_stages_import_only_earlier_stages():
    for position, stage in enumerate(STAGES):
        later = STAGES[position + 1:] + ("sweep", "progress")
        for path, tree in _modules(ROOT / "tuner" / stage):
            bad = sorted(n for n in _imported(path, tree)
                         if any(n == f"attnbench.tuner.{s}" or n.startswith(f"attnbench.tuner.{s}.")
                                for s in later))
            assert not bad, f"{path.relative_to(ROOT)} ({stage}) imports later stages {bad}"


def test_no_branching_on_an_operator_name_outside_its_package():
    names = set(registry.OPERATOR_NAMES)
    own = {ROOT / "kernels" / name for name in names}
    files = [p for p in ROOT.rglob("*.py")
             if "tests" not in p.relative_to(ROOT).parts and not any(o in p.parents for o in own)
             and p != ROOT / "kernels" / "registry.py" and ".git" not in p.parts]
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                constants = {o.value for o in operands if isinstance(o, ast.Constant)}
                assert not constants & names, (
                    f"{path.relative_to(ROOT)}:{node.lineno} compares with an operator name")
