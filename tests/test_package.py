"""`pip install .` gives a working package: the wheel carries the configs and the console
scripts, installs with constraints.txt's versions, and trains from any folder; what not every
user needs (search, cluster, tensorboard) comes only with its extra, and a command that needs a
missing extra names it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, compose_train, data_overrides, hide_module
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cifar_exp.engine import jobs, preflight
from cifar_exp.errors import UserError

# Each other console script's --help, and an option of that entry point it shows.
HELP = {
    "cifar-evaluate": "ckpt: ???",  # evaluate's Hydra config
    "cifar-report": "--eval-images",
    "cifar-bench": "--full",
    "cifar-gpucheck": "--steps",
}


def run(*command: str | Path, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"{command} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def build_wheel(tmp_path: Path) -> Path:
    """The wheel, built offline from a copy of the sources (pip builds in the source folder)."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO / "cifar_exp", source / "cifar_exp", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "conf", source / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "hydra_plugins",
        source / "hydra_plugins",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", dist, source, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("cifar_exp-*.whl")
    return wheel


def fresh_env(tmp_path: Path) -> Path:
    """A new virtual environment that sees the packages of this one (a .pth file: no torch is
    downloaded or copied) but not its cifar_exp, which is an editable install of the sources.
    Returns its bin folder."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    )
    # A .pth line only adds a folder to sys.path: the .pth files in it (the editable install's
    # hook among them) are not run, and this environment's own site-packages comes first.
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site.strip()) / "project-packages.pth").write_text("\n".join(ours) + "\n")
    return env_dir / "bin"


def requirements(wheel: Path, *extras: str) -> set[str]:
    """The names of the distributions the wheel requires with these extras."""
    with zipfile.ZipFile(wheel) as zipped:
        (metadata,) = [n for n in zipped.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zipped.read(metadata).decode().splitlines()
    wanted = [
        Requirement(line.split(": ", 1)[1]) for line in lines if line.startswith("Requires-Dist:")
    ]
    environments = [{"extra": extra} for extra in ("", *extras)]
    return {
        canonicalize_name(req.name)
        for req in wanted
        if req.marker is None or any(req.marker.evaluate(env) for env in environments)
    }


HEAVY = {"hydra-optuna-sweeper", "sqlalchemy", "hydra-submitit-launcher", "tensorboard"}


@pytest.mark.slow
def test_the_wheel_installs_with_the_constraints_and_trains_from_another_folder(
    cifar_root, cache_dir, tmp_path
):
    wheel = build_wheel(tmp_path)
    # `pip install cifar-exp` alone brings no search, cluster or TensorBoard packages
    assert not HEAVY & requirements(wheel)
    assert {"hydra-optuna-sweeper", "sqlalchemy"} <= requirements(wheel, "search")
    assert {"hydra-joblib-launcher", "hydra-submitit-launcher"} <= requirements(wheel, "cluster")
    assert "tensorboard" in requirements(wheel, "tensorboard")
    bin_dir = fresh_env(tmp_path)
    # Its dependencies are resolved against the constraints with no index: anything missing
    # or outside a pin fails here instead of being downloaded.
    run(
        sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-index",
        "--constraint", REPO / "constraints.txt", wheel, cwd=tmp_path,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.resources as r; print(r.files('cifar_exp.conf') / 'train.yaml')"
    where = run(bin_dir / "python", "-c", code, cwd=elsewhere, env=env)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")  # the wheel's, not the sources

    job = run(bin_dir / "cifar-train", "--cfg", "job", "model/norm=group", cwd=elsewhere, env=env)
    assert "_target_: cifar_exp.model.convnet.ConvNet" in job
    assert "_target_: cifar_exp.model.convnet.group_norm" in job
    module = [bin_dir / "python", "-m", "cifar_exp.train", "--cfg", "job", "model/norm=group"]
    assert run(*module, cwd=elsewhere, env=env) == job
    # the package's launcher and search configs on top of the Hydra plugins' own
    hydra = run(
        bin_dir / "cifar-train", "--cfg", "hydra", "hydra/launcher=slurm", "hparams_search=optuna",
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert "submitit_launcher.SlurmLauncher" in hydra
    assert "optuna_pruning_sweeper.OptunaPruningSweeper" in hydra  # the wheel's own plugin
    for script, line in HELP.items():
        assert line in run(bin_dir / script, "--help", cwd=elsewhere, env=env)

    run(
        bin_dir / "cifar-train", *data_overrides(cifar_root, cache_dir, train=300, test=100),
        "trainer.epochs=1", "trainer.device=cpu", "logger=none", cwd=elsewhere, env=env,
    )  # fmt: skip
    (results,) = (elsewhere / "outputs").glob("*/*/results.json")
    assert json.loads(results.read_text())["epochs"] == 1


@pytest.mark.parametrize(
    ("arg", "module", "extra"),
    [
        ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "search"),
        ("hparams_search=small_net", "hydra_plugins.hydra_optuna_sweeper", "search"),
        ("hydra/sweeper=optuna_pruning", "hydra_plugins.hydra_optuna_sweeper", "search"),
        ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "cluster"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "cluster"),
    ],
)
def test_a_missing_extra_is_named_before_hydra_starts(monkeypatch, arg, module, extra):
    hide_module(monkeypatch, module)
    jobs.require_extras(["trainer.epochs=3"])  # nothing to ask for
    with pytest.raises(UserError) as err:
        jobs.require_extras(["-m", arg])
    assert str(err.value) == (
        f"{arg} needs the {extra} extra: pip install 'cifar-exp[{extra}]' "
        "(make install installs every extra)"
    )


def test_tensorboard_missing_is_named_before_any_work(monkeypatch):
    hide_module(monkeypatch, "tensorboard")
    with pytest.raises(
        UserError, match=r"needs the tensorboard extra: pip install 'cifar-exp\[tensorboard\]'"
    ):
        preflight.check(compose_train("logger=tensorboard"))
