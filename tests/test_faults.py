"""Fault injection: a run that dies at any write of its folder, or whose disk fills there,
resumes to the same files and weights as a run left alone (tests/fault_runner.py does the
killing). The points are every write a 2-epoch run makes: its first checkpoint, summary, config
tree and results at the start; each epoch's metrics line, last.pt, best.pt and results.json;
and at the end graphs.png, per_class.json, confusion.png, summary.txt and results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, data_overrides

from cifar_exp.engine import checkpoint

TIMING = {"epoch_seconds", "images_per_second", "mean_epoch_seconds"}
SAME_BYTES = ("per_class.json", "graphs.png", "confusion.png")
MODES = ("kill", "torn", "enospc")


@pytest.fixture(scope="module")
def faults(cifar_root, cache_dir, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    spec = {
        "root": str(root),
        "modes": list(MODES),
        "overrides": [
            *data_overrides(cifar_root, cache_dir, train=200, test=100),
            "data.batch_size=50", "trainer.epochs=2", "trainer.device=cpu",
            "trainer.deterministic=true", "logger=none", "trainer.threads=1",
        ],
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_runner.py"), str(root / "spec.json")],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, json.loads((root / "outcomes.json").read_text())


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    return [without_timing(v) for v in value] if isinstance(value, list) else value


def checkpoint_facts(path: Path) -> tuple:
    state = checkpoint.load(path)
    return state["epoch"], without_timing(state["history"]), state["monitor"], state["model"]


def differences(run_dir: Path, reference: Path) -> list[str]:
    """What differs between the run's final folder and the reference's (timings aside)."""
    found = []
    for name in ("metrics.jsonl",):
        lines = [without_timing(json.loads(x)) for x in (run_dir / name).read_text().splitlines()]
        ref = [without_timing(json.loads(x)) for x in (reference / name).read_text().splitlines()]
        if lines != ref:
            found.append(name)
    for name in ("results.json",):
        if without_timing(json.loads((run_dir / name).read_text())) != without_timing(
            json.loads((reference / name).read_text())
        ):
            found.append(name)
    for name in SAME_BYTES:
        if (run_dir / name).read_bytes() != (reference / name).read_bytes():
            found.append(name)
    summary = [
        [
            line
            for line in (folder / "summary.txt").read_text().splitlines()
            if "seconds" not in line
        ]
        for folder in (run_dir, reference)
    ]
    if summary[0] != summary[1]:
        found.append("summary.txt")
    for name in ("last.pt", "best.pt"):
        mine, ref = (checkpoint_facts(f / "checkpoints" / name) for f in (run_dir, reference))
        same_weights = mine[3].keys() == ref[3].keys() and all(
            torch.equal(mine[3][k], ref[3][k]) for k in ref[3]
        )
        if mine[:3] != ref[:3] or not same_weights:
            found.append(name)
    if leftovers := sorted(p.name for p in run_dir.rglob("*.tmp")):
        found.append(f"temporary files {leftovers}")
    return found


def test_the_trace_covers_every_write_of_a_run(faults):
    _, outcomes = faults
    writes = [path for _, path in outcomes["trace"]]
    epoch = ["metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "results.json"]
    assert writes[:4] == ["checkpoints/last.pt", "summary.txt", "config_tree.log", "results.json"]
    assert writes[4:12] == epoch * 2  # epoch 2 is the better one here: best.pt is written
    assert writes[12:] == [
        "graphs.png", "per_class.json", "confusion.png", "summary.txt", "results.json"
    ]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_a_run_faulted_at_any_write_resumes_to_the_same_files_and_weights(faults, mode):
    root, outcomes = faults
    cases = [c for c in outcomes["cases"] if c["mode"] == mode]
    assert len(cases) == len(outcomes["trace"])
    wrong = []
    for case in cases:
        name = f"{mode} at write {case['at']} ({case['write'][1]})"
        run_dir = root / f"{mode}-{case['at']}"
        output = (root / f"{mode}-{case['at']}.log").read_text()
        if mode == "enospc":
            # One line naming the file and the disk, no traceback, nothing half-written left.
            expected = f"no space left on the device to write {run_dir / case['write'][1]}"
            if case["faulted"] != 2 or expected not in output or "Traceback" in output:
                wrong.append(f"{name}: exit {case['faulted']}, output:\n{output[-1500:]}")
            if case["leftovers"]:
                wrong.append(f"{name}: left {case['leftovers']}")
        elif case["faulted"] != -9:
            wrong.append(f"{name}: not killed (exit {case['faulted']})")
        if case["resumed"] != 0:
            log = (root / f"{mode}-{case['at']}.resume.log").read_text()
            wrong.append(f"{name}: the resumed run exited {case['resumed']}:\n{log[-2000:]}")
        elif found := differences(run_dir, root / "reference"):
            wrong.append(f"{name}: differs from the uninterrupted run in {found}")
    assert not wrong, "\n".join(wrong)


def test_a_run_killed_mid_line_sets_the_partial_line_aside(faults):
    root, outcomes = faults
    (at,) = [c["at"] for c in outcomes["cases"]
             if c["mode"] == "torn" and c["write"][1] == "metrics.jsonl"][:1]  # fmt: skip
    aside = (root / f"torn-{at}" / "metrics.damaged.jsonl").read_text()
    assert aside.startswith('{"epoch": 1') and len(aside.splitlines()) == 1
