"""sweeps/*.yaml: the command line a W&B agent builds from each file is one this program takes.

The W&B controller needs the W&B server, so the values are picked here (each parameter's
first and last choice, or its range's ends) and turned into the command by wandb's own
agent code (`create_sweep_command_args`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, compose_train
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from cifar_exp.engine import preflight

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def picked(parameters: dict, end: int) -> dict:
    """One value per parameter, as the controller sends it: first (end 0) or last (end -1)."""
    values = {}
    for name, spec in parameters.items():
        if "value" in spec:
            values[name] = spec["value"]
        elif "values" in spec:
            values[name] = spec["values"][end]
        else:
            values[name] = spec["max" if end else "min"]
    return values


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The agent's command: its macros filled in, `python` being this interpreter."""
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros["env"] = ["/usr/bin/env"]
    command = []
    for chunk in sweep["command"]:
        if chunk.startswith("${"):
            command += macros[chunk[2:-1]]
        else:
            command.append(sys.executable if chunk == "python" else chunk)
    return command


def test_there_are_sweeps():
    assert {p.name for p in SWEEPS} >= {"search.yaml", "norm_grid.yaml"}


@pytest.mark.parametrize("end", [0, -1], ids=["first", "last"])
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_agent_arguments_compose_validate_and_set_the_values(path, end):
    sweep = yaml.safe_load(path.read_text())
    values = picked(sweep["parameters"], end)
    command = agent_command(sweep, values)
    assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "cifar_exp.train"]
    cfg = compose_train(*command[4:])
    settings = preflight.check(cfg)
    for key, value in values.items():
        composed = OmegaConf.select(cfg, key.replace("/", "."))
        if OmegaConf.is_config(composed):  # a group choice (scheduler=cosine, model/norm=group)
            option = OmegaConf.select(compose_train(f"{key}={value}"), key.replace("/", "."))
            assert composed == option
        else:
            assert composed == (pytest.approx(value) if isinstance(value, float) else value)
    # the sweep's metric is what the run writes to its W&B summary, measured on the hold-out
    assert sweep["metric"]["name"] == f"best_{settings.optimized_metric}" == "best_val_acc"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_program_accepts_the_agent_command_line(path):
    sweep = yaml.safe_load(path.read_text())
    command = agent_command(sweep, picked(sweep["parameters"], -1))
    proc = subprocess.run(
        [*command, "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["data"]["val_size"] == 5000 and job["logger"]["mode"] == "online"
