"""The house rules, checked: the layering contracts (import-linter, on the tree as it installs), every
generated name spelled once, torch's private APIs behind one module, and product files within their
line budget. Each check is also shown to fail on a violation."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
SETUP = tomllib.loads(PYPROJECT.read_text())
PACKAGE_DIRS: dict[str, str] = SETUP["tool"]["setuptools"]["package-dir"]  # import name -> folder
PRODUCT = [ROOT / folder for folder in PACKAGE_DIRS.values()]
LINE_BUDGET = 400
NAMES_MODULE = ROOT / "nesc" / "core" / "names.py"
COMPAT_MODULE = ROOT / "nesc" / "core" / "compat.py"
# "nesc_" strings that are not generated names: the registry name of a baseline method (kept: it
# names result files of the experiments).
NOT_GENERATED = {"nesc_fixed"}


def product_files() -> list[Path]:
    return sorted(p for folder in PRODUCT for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def stage(tmp: Path) -> Path:
    """The package as setuptools installs it (passes/ -> nesc/passes, ...), for import-linter, which
    reads the file system under the root package and so does not see the package-dir mapping."""
    for name, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: kv[0].count(".")):
        target = tmp.joinpath(*name.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    # cwd and PYTHONPATH point at the staged tree only, so `nesc` resolves there and not to the checkout.
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(PYPROJECT), "--no-cache"], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


def test_layering_contracts_hold(tmp_path) -> None:
    result = lint_imports(stage(tmp_path))
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout + result.stderr


def test_the_contracts_fail_when_a_lower_layer_imports_a_higher_one(tmp_path) -> None:
    tree = stage(tmp_path)
    with open(tree / "nesc" / "core" / "names.py", "a") as f:
        f.write("\nimport nesc.report  # a core module reaching up\n")
    result = lint_imports(tree)
    assert result.returncode != 0 and "nesc.core.names -> nesc.report" in result.stdout, result.stdout


def test_every_module_of_nesc_belongs_to_a_layer(tmp_path) -> None:
    tree = stage(tmp_path) / "nesc"
    contract = next(c for c in SETUP["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    layered = {name.strip() for layer in contract["layers"] for name in re.split(r"[|:]", layer)}
    top = {p.stem for p in tree.glob("*.py") if p.name != "__init__.py"}
    top |= {p.name for p in tree.iterdir() if (p / "__init__.py").is_file()}
    assert top - layered == set(), "a module outside every layer is not checked; add it to a layer"


def test_every_package_folder_is_installed(tmp_path) -> None:
    """A wheel holds only the packages pyproject lists: a new sub-package must be listed there."""
    tree = stage(tmp_path)
    found = {".".join(p.relative_to(tree).parts) for p in tree.rglob("*") if (p / "__init__.py").is_file()}
    assert found == set(SETUP["tool"]["setuptools"]["packages"])


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants of the code, docstrings excluded (f-strings contribute their literal parts)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def generated_name_literals(path: Path) -> list[str]:
    return [f"{_where(path)}:{line}: {word!r}" for line, text in _code_strings(ast.parse(path.read_text()))
            for word in re.findall(r"\bnesc_\w*", text) if word not in NOT_GENERATED]


def test_generated_names_are_spelled_only_in_the_names_module() -> None:
    hits = [h for p in product_files() if p != NAMES_MODULE for h in generated_name_literals(p)]
    assert hits == [], "use the constants of nesc.core.names:\n" + "\n".join(hits)


def test_the_names_check_finds_a_literal(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may say nesc_plan."""\n\ndef f(gm):\n'
                   '    return gm.meta[f"nesc_{1}"], gm.meta["nesc_plan"], "nesc_fixed"\n')
    assert sorted(h.split(": ")[1] for h in generated_name_literals(bad)) == ["'nesc_'", "'nesc_plan'"]


def private_torch_uses(path: Path) -> list[str]:
    """``torch._x``, ``torch.a._b`` and names imported from a private torch module or with a private
    name, and private attributes read on anything but ``self``/``cls``/a module-level ``_name``."""
    hits = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        where = f"{_where(path)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names):
                hits.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            hits += [f"{where}: import {a.name}" for a in node.names
                     if a.name.startswith("torch") and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (_own(node.value) or _is_op(node.value)):
                hits.append(f"{where}: .{node.attr}")
    return hits


def _own(value: ast.AST) -> bool:
    """``self._x``, ``cls._x``, ``ctx._x`` (autograd context) or a module-level ``_helper._x``."""
    return isinstance(value, ast.Name) and (value.id in ("self", "cls", "ctx") or value.id.startswith("_"))


def _is_op(value: ast.AST) -> bool:
    """``torch.ops.aten._assert_scalar``, ``aten._to_copy``: an operator whose name starts with "_"."""
    chain = []
    while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
    return "ops" in chain or (isinstance(value, ast.Name) and value.id == "aten")


def test_private_torch_apis_are_used_only_in_compat() -> None:
    # backends/tvm/adapter.py is TVM's counterpart of compat and may reach into TVM's internals.
    allowed = {COMPAT_MODULE, ROOT / "backends" / "tvm" / "adapter.py"}
    hits = [h for p in product_files() if p not in allowed for h in private_torch_uses(p)]
    assert hits == [], "go through nesc.core.compat:\n" + "\n".join(hits)


def test_the_private_api_check_finds_each_form(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch._dynamo\nfrom torch.utils._pytree import tree_map\nfrom torch.fx.graph import "
                   "_PyTreeCodeGen\nx = torch._C.DispatchKey\ny = mod._parameters\nz = self._ok\n")
    assert len(private_torch_uses(bad)) == 5


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_files_stay_within_the_line_budget(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= LINE_BUDGET, f"{path.relative_to(ROOT)} has {lines} lines (budget {LINE_BUDGET}): split it by job"
