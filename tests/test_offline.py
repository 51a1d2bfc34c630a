"""Without a network, starting the project prints no warning: albumentations (whose 2.0.x
releases ask PyPI for a newer version on import) is imported only for augment=s9, and its
update check is off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, data_overrides

# Where user namespaces are allowed, `unshare -rn` gives the process a network with no
# interfaces; elsewhere a sitecustomize makes every host name lookup fail, as offline.
_UNSHARE = ["unshare", "-rn"]
_NO_LOOKUPS = """
import socket
def _offline(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "offline (test_offline.py)")
socket.getaddrinfo = _offline
"""


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*_UNSHARE, "true"], capture_output=True).returncode == 0


def run_offline(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python args...` from the repo root with the network unavailable and the user's
    environment free of any albumentations setting."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    prefix = []
    if _can_unshare():
        prefix = _UNSHARE
    else:
        site = tmp_path / "offline-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_NO_LOOKUPS)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [*prefix, sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Error fetching version info" not in output
    assert "Warning" not in output, output


def test_the_offline_stand_in_reproduces_albumentations_warning(tmp_path):
    """The check is real: albumentations' own update check warns under it."""
    proc = run_offline(["-c", "import albumentations"], tmp_path)
    assert "Error fetching version info" in proc.stderr


@pytest.mark.slow
def test_help_prints_no_warning_offline(tmp_path):
    assert_quiet(run_offline(["-m", "cifar_exp.train", "--help"], tmp_path))


@pytest.mark.slow
def test_default_start_does_not_import_albumentations(tmp_path):
    proc = run_offline(
        ["-c", "import sys, cifar_exp.train, cifar_exp.engine.build; "
               "assert 'albumentations' not in sys.modules"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("augment", ["s9_batched", "s9"])
@pytest.mark.slow
def test_training_starts_without_a_warning_offline(augment, cifar_root, cache_dir, tmp_path):
    """The default (s9_batched) never imports albumentations; s9 does, with its check off."""
    overrides = data_overrides(cifar_root, cache_dir, 200, 100)
    proc = run_offline(
        ["-m", "cifar_exp.train", *overrides, f"augment={augment}", "trainer.epochs=1",
         f"output_root={tmp_path / 'runs'}"],
        tmp_path,
    )  # fmt: skip
    assert_quiet(proc)
