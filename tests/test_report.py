"""A comparison end to end: the norm sweep on real images, then the report on its folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, data_overrides, read_metrics, run_cli, section_rows, wandb_records
from scipy import stats

PNG = b"\x89PNG\r\n\x1a\n"
NORMS = ["batch", "group", "layer"]


@pytest.fixture(scope="module")
def sweep(cifar_root, cache_dir, tmp_path_factory):
    """experiment=norm_comparison for one epoch on 300 training and 200 test images."""
    sweep_dir = tmp_path_factory.mktemp("norm-sweep") / "sweep"
    run_cli(
        "train",
        "-m",
        "experiment=norm_comparison",
        *data_overrides(cifar_root, cache_dir, train=300, test=200),
        "trainer.epochs=1",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return sweep_dir


@pytest.fixture(scope="module")
def report(sweep):
    run_cli("report", str(sweep), "--images", "8", "--wandb", "offline")
    return sweep


def table_rows(report_md: str) -> list[list[str]]:
    """The cells of every data row of the markdown table."""
    lines = [line for line in report_md.splitlines() if re.match(r"\| \[\d+\]", line)]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_sweep_runs_one_folder_per_norm(sweep):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [r.name.split("_", 1)[0] for r in runs] == ["0", "1", "2"]
    for run, norm in zip(runs, NORMS, strict=True):
        assert run.name.endswith(f"model-norm-{norm}_trainer.epochs-1")  # no nested folders
        assert len(read_metrics(run)) == 1


@pytest.mark.slow
def test_report_has_one_row_per_run_with_its_numbers(report):
    rows = table_rows((report / "report.md").read_text())
    assert [row[1] for row in rows] == [f"model/norm={norm}" for norm in NORMS]
    runs = sorted(p for p in report.iterdir() if p.is_dir() and p.name != "wandb")
    for row, run in zip(rows, runs, strict=True):
        (metrics,) = read_metrics(run)
        assert row[2:4] == ["180,298", "105"]  # parameters, receptive field
        assert row[4] == f"{100 * metrics['test_acc']:.2f}% (epoch 1, by test_acc)"
        assert row[5] == f"{100 * metrics['test_acc']:.2f}%"
        assert row[6] == "1"
        assert float(row[7]) == pytest.approx(metrics["epoch_seconds"], abs=0.05)
    common = next(
        line for line in (report / "report.md").read_text().splitlines() if "common" in line
    )
    assert "`experiment=norm_comparison`" in common and "`data.limit_train=300`" in common


def test_runs_without_a_logger_still_write_their_per_class_view(sweep):
    for run in sorted(p for p in sweep.iterdir() if (p / "results.json").is_file()):
        view = json.loads((run / "per_class.json").read_text())
        assert len(view["per_class_accuracy"]) == 10 and view["images"] == 200
        assert (run / "confusion.png").read_bytes()[:8] == PNG


def test_report_writes_the_curves_and_a_grid_per_run(report):
    assert (report / "report.png").read_bytes()[:8] == PNG
    runs = sorted(p for p in report.iterdir() if p.is_dir() and p.name != "wandb")
    grids = [run / "misclassified.png" for run in runs]
    assert all(grid.read_bytes()[:8] == PNG for grid in grids)
    text = (report / "report.md").read_text()
    assert all(f"]({grid.parent.name}/misclassified.png)" in text for grid in grids)


def test_report_logs_the_table_to_wandb(report):
    records = wandb_records(report)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    tables = [h for h in history if h.get("runs._type") == "table-file"]
    assert len(tables) == 1 and tables[0]["runs.nrows"] == 3


@pytest.mark.slow
def test_report_reads_each_runs_results_and_lists_a_run_without_them(sweep, tmp_path):
    """The numbers come from results.json alone: the report measures no network again."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    first, second, third = sorted(p for p in copy.iterdir() if p.is_dir() and p.name != "wandb")
    results = json.loads((first / "results.json").read_text())
    results.update(params=123, receptive_field=45, best_test_acc=0.5)
    (first / "results.json").write_text(json.dumps(results))
    (second / "results.json").unlink()  # failed before training began, say
    proc = run_cli("report", str(copy), "--images", "0")
    left_out = f"{second} (failed, no results.json: it stopped before training began)"
    assert left_out in proc.stdout + proc.stderr
    assert section_rows((copy / "report.md").read_text(), "## Not compared") == [
        [str(second), "failed", "no results.json: it stopped before training began"]
    ]
    rows = table_rows((copy / "report.md").read_text())
    assert [row[1] for row in rows] == ["model/norm=batch", "model/norm=layer"]
    assert rows[0][2:5] == ["123", "45", "50.00% (epoch 1, by test_acc)"]
    assert third.name.endswith("layer_trainer.epochs-1")


@pytest.mark.slow
def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("report", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2
    assert f"No finished run in {tmp_path / 'empty'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "empty" / "report.md").exists()


@pytest.mark.slow
def test_report_aggregates_seeds_by_configuration_with_cis_and_welch(seed_sweep, tmp_path):
    run_cli("report", str(seed_sweep), "--images", "0", "--out", str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    runs = [p for p in seed_sweep.iterdir() if (p / "results.json").is_file()]
    results = [json.loads((p / "results.json").read_text()) for p in runs]
    by_id: dict[str, list[dict]] = {}
    for r in results:
        by_id.setdefault(r["configuration_id"], []).append(r)
    rows = section_rows(text, "## By configuration")
    assert len(rows) == 2 == len(by_id)  # one row per configuration, not per run
    assert sorted(row[1] for row in rows) == ["model/norm=batch", "model/norm=group"]
    t975 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom
    for row in rows:
        group = by_id[row[0].strip("`")]
        assert row[2] == "3"
        for first, key in ((3, "best_test_acc"), (6, "final_test_acc")):
            values = np.array([100 * r[key] for r in group])
            mean, std = values.mean(), values.std(ddof=1)
            assert row[first] == f"{mean:.2f} ± {std:.2f}"
            assert row[first + 1] == f"{values.min():.2f}–{values.max():.2f}"
            half = t975 * std / np.sqrt(3)
            assert row[first + 2] == f"{mean - half:.2f}–{mean + half:.2f}"
    assert "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)" in text
    diffs = section_rows(text, "Differences (")
    assert [d[0] for d in diffs] == ["best_test_acc", "final_test_acc"]
    for diff in diffs:
        a, b = (by_id[cell.strip("`")] for cell in diff[1:3])
        p = stats.ttest_ind([r[diff[0]] for r in a], [r[diff[0]] for r in b], equal_var=False)
        assert diff[4] == f"{p.pvalue:.3g}"
        assert diff[5] == ("yes" if p.pvalue < 0.05 else "no")
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_a_killed_sweep_reports_its_finished_runs_and_lists_the_others(
    cifar_root, cache_dir, tmp_path
):
    """seed=0,1,2, killed during job 1: job 0 is compared, job 1 (killed) and job 2 (never
    started) are listed with their state."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp.train", "-m", "seed=0,1,2", "logger=none",
         *data_overrides(cifar_root, cache_dir, train=1500, test=100), "trainer.epochs=2",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(sweep.glob("1_*/results.json")):  # job 1 has begun training
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    (killed,) = sweep.glob("1_*")
    assert json.loads((killed / "results.json").read_text())["state"] == "running"

    out = run_cli("report", str(sweep), "--images", "0")
    assert f"{killed} (killed, 0 of 2 epochs)" in out.stdout + out.stderr
    text = (sweep / "report.md").read_text()
    ((_, overrides, *_),) = table_rows(text)
    assert "seed=0" in overrides.split()
    assert [row[2] for row in section_rows(text, "## By configuration")] == ["1"]
    assert section_rows(text, "## Not compared") == [
        [str(killed), "killed", "0 of 2 epochs"],
        [f"{sweep} job 2 (seed=2)", "never started", ""],
    ]


@pytest.mark.slow
def test_a_damaged_run_is_named_and_the_others_are_reported(sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    first, second, third = sorted(p for p in copy.iterdir() if p.is_dir() and p.name != "wandb")
    with (first / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "train_lo')  # a line cut short
    (second / ".hydra" / "hydra.yaml").unlink()
    (third / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    proc = run_cli("report", str(copy), "--images", "0")
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert f"{first}: 1 damaged line(s) of metrics.jsonl left out of its curves" in output
    text = (copy / "report.md").read_text()
    assert [row[1] for row in table_rows(text)] == ["model/norm=batch", "model/norm=group"]
    ((where, state, detail),) = section_rows(text, "## Not compared")
    assert (where, state) == (str(third), "damaged") and "while parsing" in detail
