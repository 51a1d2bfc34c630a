"""The documentation: the site builds with `mkdocs build --strict` (no broken link or anchor),
the README stays a short guide whose figures BENCHMARKS.md holds with their commands, and the
pages speak of the project alone (no paths outside the repository)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

README, BENCHMARKS = REPO / "README.md", REPO / "BENCHMARKS.md"
PAGES = [README, BENCHMARKS, *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "troubleshooting" / "index.html").is_file()


def test_the_readme_is_a_short_guide_to_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert re.search(r"^make train\b", text, re.M) and re.search(r"^make test\b(?!-)", text, re.M)
    assert 'make train ARGS="experiment=first_run"' in text


def test_every_figure_the_readme_quotes_is_in_benchmarks_with_its_command():
    benchmarks = BENCHMARKS.read_text()
    figures = re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?%|\d+\.\d+x", README.read_text())
    assert figures and [f for f in figures if f not in benchmarks] == []
    for command in re.findall(r"\| `((?:make|python) [^`]+)` \|", README.read_text()):
        assert command in benchmarks, command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_no_path_leaves_the_repository(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: {target}"
    assert "../shared" not in text and "/work/" not in text
