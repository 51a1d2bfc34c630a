"""The package's layers (cifar_exp/__init__.py): import-linter's contracts in pyproject.toml
hold for the sources, and each one breaks when a module breaks it, a TYPE_CHECKING import
included."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the copy of the package in `root`, with the project's contracts."""
    # The copy, before the editable install; wide lines: one line per contract.
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", REPO / "pyproject.toml"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_sources_keep_every_contract():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "added", "contract"),
    [
        # a type from above, for an annotation only: it still counts
        ("settings.py", "if TYPE_CHECKING:\n    from cifar_exp.engine.learner import Learner\n",
         "Layers point down"),
        ("data/loaders.py", "from cifar_exp.engine import compute\n", "Layers point down"),
        ("engine/build.py", "from cifar_exp import train\n", "Layers point down"),  # an entry point
        ("track/record.py", "import wandb\n", "Only the tracker imports wandb"),
        ("engine/compute.py", "from cifar_exp.engine import build\n", "No import cycle"),
    ],
)  # fmt: skip
def test_a_module_that_breaks_a_layer_is_caught(tmp_path, module, added, contract):
    shutil.copytree(REPO / "cifar_exp", tmp_path / "cifar_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    source = tmp_path / "cifar_exp" / module
    text = source.read_text()
    if "TYPE_CHECKING" in added and "import TYPE_CHECKING" not in text:
        added = "from typing import TYPE_CHECKING\n" + added
    # After the module's docstring and __future__ import, where imports go.
    head, future, rest = text.partition("from __future__ import annotations\n")
    source.write_text(head + future + added + rest)
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    broken = [line for line in proc.stdout.splitlines() if " BROKEN" in line]
    assert len(broken) == 1 and broken[0].startswith(contract), proc.stdout


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_tracker_imports_wandb_or_tensorboard():
    """TensorBoard comes through torch.utils.tensorboard, which import-linter sees only as
    torch: this is its contract."""
    talking = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "cifar_exp").rglob("*.py")
        if any(
            name.split(".")[0] in ("wandb", "tensorboard")
            or name.startswith("torch.utils.tensorboard")
            for name in imported_modules(path)
        )
    }
    assert talking == {"cifar_exp/track/tracker.py"}
