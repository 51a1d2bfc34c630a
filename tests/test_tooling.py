"""The developer tools: `make help` and the pre-commit hooks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO


def test_make_help_lists_every_target_with_its_description():
    targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M)
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    described = dict(line.split(maxsplit=1) for line in shown)
    assert list(described) == targets and "test" in targets
    assert all(len(text) > 10 for text in described.values()), described
    assert described["help"] == "list the targets and what each does"


def test_pre_commit_runs_ruff_at_the_projects_version_on_its_python():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    (repo,) = config["repos"]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    assert [hook["id"] for hook in repo["hooks"]] == ["ruff-check", "ruff-format"]
    ruff = Path(sys.executable).parent / "ruff"
    version = subprocess.run([ruff, "--version"], capture_output=True, text=True).stdout
    assert repo["rev"] == "v" + version.split()[1]
    for path in ("cifar_exp/train.py", "tests/test_tooling.py", "tools/freeze_constraints.py"):
        assert all(re.match(hook["files"], path) for hook in repo["hooks"])
