"""What a W&B dashboard shows of a run, read back from offline runs on real images:
define_metric summaries (also of a run stopped early), configuration id, tags, job types and
the per-run model artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, compose_train, data_overrides, read_metrics, run_cli, wandb_records
from omegaconf import OmegaConf

from cifar_exp.settings import SCORES
from cifar_exp.track.record import configuration_id


def final_summary(records: list[dict]) -> dict:
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    return summary


def defined_metrics(records: list[dict]) -> dict[str, dict]:
    """The define_metric records by metric name (or glob)."""
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    return {m.get("name") or m["glob_name"]: m for m in metrics}


@pytest.fixture(scope="module")
def stopped_run(cifar_root, cache_dir, tmp_path_factory):
    """A 4-epoch run stopped by SIGTERM during epoch 3: it never reaches its end."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cifar_exp.train",
            *data_overrides(cifar_root, cache_dir, train=500, test=200),
            "trainer.epochs=4", f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and metrics.read_text().count("\n") == 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "epoch 2 never finished"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert len(read_metrics(run_dir)) == 2, "the signal came after epoch 3 ended"
    return run_dir


@pytest.mark.slow
def test_stopped_run_summary_holds_the_best_values(stopped_run):
    records = wandb_records(stopped_run)
    metrics = read_metrics(stopped_run)
    defined = defined_metrics(records)
    assert defined["*"]["step_metric"] == "epoch"
    for name in SCORES:
        assert defined[name]["summary"] == ({"min": True} if "loss" in name else {"max": True})
    summary = final_summary(records)
    assert summary["test_acc"] == {"max": pytest.approx(max(m["test_acc"] for m in metrics))}
    assert summary["test_loss"] == {"min": pytest.approx(min(m["test_loss"] for m in metrics))}
    assert summary["train_acc"] == {"max": pytest.approx(max(m["train_acc"] for m in metrics))}
    # written every epoch, not only at the end the stopped run never reached
    best = max(metrics, key=lambda m: m["test_acc"])
    assert summary["best_test_acc"] == pytest.approx(best["test_acc"])
    assert summary["best_epoch"] == best["epoch"] and summary["epochs"] == 2
    assert not [r for r in records if r["type"] == "artifact"]  # no end, no model artifact


def test_the_sweep_metric_is_defined_and_logged_every_epoch(stopped_run):
    records = wandb_records(stopped_run)
    sweep_metric = defined_metrics(records)["best_test_acc"]
    assert sweep_metric["step_metric"] == "epoch" and sweep_metric["summary"] == {"last": True}
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all("best_test_acc" in h for h in history)


def config_id(*overrides: str) -> str:
    return configuration_id(OmegaConf.to_container(compose_train(*overrides), resolve=True))


def test_configuration_id_ignores_seed_and_runtime_keys_only():
    plain = config_id()
    assert plain == config_id("seed=7", "data.root=/elsewhere", "trainer.device=cpu",
                              "logger.mode=disabled", "trainer.threads=1")  # fmt: skip
    assert len({plain, config_id("model/norm=group"), config_id("optimizer.lr=0.01")}) == 3


def test_a_config_naming_earlier_modules_keeps_its_configuration_id():
    """Runs written before the modules moved name cifar_exp.models, .augment and .optim: they
    pool with today's runs of the same config."""
    today = OmegaConf.to_container(compose_train("optimizer=muon"), resolve=True)
    earlier = OmegaConf.to_container(compose_train("optimizer=muon"), resolve=True)
    earlier["model"]["_target_"] = "cifar_exp.models.ConvNet"
    earlier["augment"]["_target_"] = "cifar_exp.augment.BatchAugment"
    earlier["optimizer"]["_target_"] = "cifar_exp.optim.MuonForFilters"
    assert configuration_id(earlier) == configuration_id(today)
    earlier["optimizer"]["lr"] = 1.0
    assert configuration_id(earlier) != configuration_id(today)


def run_header(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


@pytest.mark.slow
def test_seed_runs_share_a_configuration_id_in_results_config_and_tags(seed_sweep):
    runs = sorted(p for p in seed_sweep.iterdir() if p.is_dir())
    assert len(runs) == 6
    ids = {}
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        header = run_header(wandb_records(run))
        norm = OmegaConf.load(run / ".hydra" / "config.yaml").model.norm._target_
        config = header["config"]["update"]
        assert config["configuration_id"] == results["configuration_id"]
        assert config["seed"] in (0, 1, 2)
        assert header["job_type"] == "train"
        norm_tag = "norm:batch" if norm.endswith("BatchNorm2d") else "norm:group"
        assert set(header["tags"]) == {
            "experiment:norm_comparison", "model:s9", norm_tag, "augment:s9_batched",
            f"config:{results['configuration_id']}",
        }  # fmt: skip
        ids.setdefault(norm, set()).add(results["configuration_id"])
    assert len(ids) == 2 and all(len(shared) == 1 for shared in ids.values())
    assert len(set.union(*ids.values())) == 2


def test_each_run_logs_its_own_model_artifact_with_metadata(seed_sweep):
    names = set()
    for run in sorted(p for p in seed_sweep.iterdir() if p.is_dir()):
        records = wandb_records(run)
        results = json.loads((run / "results.json").read_text())
        artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
        (artifact,) = [a for a in artifacts if a["type"] == "model"]
        run_id = run_header(records)["run_id"]
        assert artifact["name"] == f"model-{run_id}" and artifact["type"] == "model"
        assert set(artifact["aliases"]) == {"best", "latest"}
        metadata = json.loads(artifact["metadata"])
        assert metadata["best_test_acc"] == pytest.approx(results["best_test_acc"])
        assert metadata["final_test_acc"] == pytest.approx(results["final_test_acc"])
        assert metadata["best_epoch"] == results["best_epoch"]
        assert metadata["params"] == results["params"] == 180_298
        assert metadata["receptive_field"] == results["receptive_field"]
        assert metadata["configuration_id"] == results["configuration_id"]
        names.add(artifact["name"])
    assert len(names) == 6


def test_run_ends_with_the_best_checkpoints_per_class_view(seed_sweep):
    run = min(p for p in seed_sweep.iterdir() if p.is_dir())
    results = json.loads((run / "results.json").read_text())
    view = json.loads((run / "per_class.json").read_text())
    confusion = view["confusion"]
    assert view["epoch"] == results["best_epoch"] and view["images"] == 100
    assert view["accuracy"] == pytest.approx(results["best_test_acc"], abs=1e-6)
    assert sum(map(sum, confusion)) == 100
    for i, name in enumerate(view["classes"]):
        assert view["per_class_accuracy"][name] == pytest.approx(confusion[i][i] / 10)
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = wandb_records(run)
    summary = final_summary(records)
    assert summary["class_acc/cat"] == pytest.approx(view["per_class_accuracy"]["cat"])
    history = {
        k: v for r in records if r["type"] == "history" for k, v in r["history"]["item"].items()
    }
    assert history["confusion_matrix_table._type"] == "table-file"  # W&B's confusion panel
    assert history["misclassified._type"] == "table-file"
    (table_file,) = run.glob(f"wandb/offline-run-*/files/{history['misclassified.path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["image", "true", "predicted", "confidence"]
    wrong = 100 - sum(confusion[i][i] for i in range(10))
    assert len(table["data"]) == min(wrong, 100) > 0
    for _, true, predicted, confidence in table["data"]:
        assert true != predicted and 0.1 <= confidence <= 1  # the top of 10 probabilities


@pytest.mark.slow
def test_logger_tensorboard_writes_event_files_that_tensorboard_reads(
    cifar_root, cache_dir, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_cli(
        "train",
        *data_overrides(cifar_root, cache_dir, train=200, test=100),
        "trainer.epochs=2",
        "logger=tensorboard",
        f"hydra.run.dir={run_dir}",
    )
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics = read_metrics(run_dir)
    for key in ("train_loss", "test_acc", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics])
    assert not list(run_dir.glob("wandb/offline-run-*"))  # TensorBoard alone
