"""End to end through the command line, on real images: train, track, evaluate, sweep, fail."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import compose_train, data_overrides, read_metrics, run_cli, wandb_records

from cifar_exp.engine.checkpoint import load
from cifar_exp.engine.inference import predict_test_set
from cifar_exp.settings import DataSettings, checked

# The list, written out: a change to loop.EPOCH_METRICS must be deliberate.
METRIC_KEYS = {
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
    "images_per_second",
}  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An empty home folder for the runs, to prove W&B writes nothing there."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def smoke_run(cifar_root, cache_dir, tmp_path_factory, home):
    """The seed recipe for two epochs on 5,000 training and 1,000 test images."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_cli(
        "train",
        *data_overrides(cifar_root, cache_dir, train=5000, test=1000),
        "trainer.epochs=2",
        f"hydra.run.dir={run_dir}",
        env={"HOME": str(home)},
    )
    return run_dir


@pytest.mark.slow
def test_smoke_training_learns_and_records_every_epoch(smoke_run):
    metrics = read_metrics(smoke_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(set(m) == METRIC_KEYS for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert max(m["test_acc"] for m in metrics) > 0.20  # twice chance; 0.304 when written
    assert all(m["images_per_second"] > 0 and m["lr"] == 0.05 for m in metrics)


def test_run_folder_holds_every_file(smoke_run):
    for name in ("metrics.jsonl", "results.json", "summary.txt", "graphs.png",
                 "checkpoints/last.pt", "checkpoints/best.pt", ".hydra/config.yaml"):  # fmt: skip
        assert (smoke_run / name).is_file(), name
    assert (smoke_run / "graphs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (smoke_run / "summary.txt").read_text()
    assert "Total params: 180,298" in summary and "best_test_acc" in summary
    assert len(list(smoke_run.glob("wandb/offline-run-*/run-*.wandb"))) == 1


def test_wandb_keeps_its_folders_in_the_run_folder(smoke_run, home):
    assert not [p for p in home.rglob("*") if "wandb" in p.name.lower()]
    assert (smoke_run / "wandb" / "cache").is_dir()


def test_wandb_offline_run_reads_back_with_the_logged_metrics(smoke_run):
    records = wandb_records(smoke_run)
    metrics = read_metrics(smoke_run)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for logged, written in zip(history, metrics, strict=True):
        assert logged["test_acc"] == pytest.approx(written["test_acc"])
        assert logged["train_loss"] == pytest.approx(written["train_loss"])
    assert any("graphs._type" in h for h in history)

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = run["config"]["update"]
    assert config["trainer"]["epochs"] == 2 and config["model"]["norm"]["_target_"].endswith(
        "BatchNorm2d"
    )

    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["params"] == 180_298 and summary["receptive_field"] == 105
    assert summary["best_test_acc"] == pytest.approx(max(m["test_acc"] for m in metrics))
    assert summary["final_test_acc"] == pytest.approx(metrics[-1]["test_acc"])

    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    models = [a for a in artifacts if a["type"] == "model"]  # the others: W&B's table files
    assert [a["manifest"]["contents"][0]["path"] for a in models] == ["best.pt"]


@pytest.mark.slow
def test_evaluate_cli_scores_the_best_checkpoint(smoke_run, cifar_root, cache_dir, tmp_path):
    proc = run_cli(
        "evaluate",
        f"ckpt={smoke_run / 'checkpoints' / 'best.pt'}",
        *data_overrides(cifar_root, cache_dir, train=10, test=1000)[:5],
        f"hydra.run.dir={tmp_path}",
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    best = max(m["test_acc"] for m in read_metrics(smoke_run))
    assert result["accuracy"] == pytest.approx(best, abs=1e-6)  # same images, same weights
    assert result["images"] == 1000
    assert set(result["per_class_accuracy"]) >= {"airplane", "truck"}
    assert "airplane" in proc.stdout + proc.stderr  # the per-class table is printed
    assert (tmp_path / "per_class.json").is_file() and (tmp_path / "confusion.png").is_file()


@pytest.mark.slow
def test_evaluate_finds_the_data_where_the_run_trained(smoke_run, cifar_root, tmp_path):
    ckpt = smoke_run / "checkpoints" / "best.pt"
    run_cli("evaluate", f"ckpt={ckpt}", "logger=none", f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "eval.json").read_text())["data"] == {
        "root": str(cifar_root),
        "format": "folder",
    }
    proc = run_cli(  # the command line still wins
        "evaluate", f"ckpt={ckpt}", "data.root=/nonexistent", "logger=none",
        f"hydra.run.dir={tmp_path / 'elsewhere'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "data.root=/nonexistent" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_evaluate_makes_its_own_wandb_run_with_the_checkpoint_hash(
    smoke_run, cifar_root, cache_dir, tmp_path
):
    ckpt = smoke_run / "checkpoints" / "best.pt"
    data = data_overrides(cifar_root, cache_dir, train=10, test=200)[:5]
    run_cli("evaluate", f"ckpt={ckpt}", *data, f"hydra.run.dir={tmp_path}")
    records = wandb_records(tmp_path)
    header = next(r["run"] for r in records if r["type"] == "run")
    trained = next(r["run"] for r in wandb_records(smoke_run) if r["type"] == "run")
    assert header["job_type"] == "evaluate" and trained["job_type"] == "train"
    config = header["config"]["update"]
    assert config["ckpt"] == str(ckpt.resolve())
    assert config["ckpt_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert config["trained_by"]["wandb_run_id"] == trained["run_id"]
    assert header["tags"] == trained["tags"]  # the training run's, its configuration id among them
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert summary["accuracy"] == pytest.approx(result["accuracy"])
    assert "class_acc/truck" in summary


@pytest.fixture(scope="module")
def sweep(cifar_root, cache_dir, tmp_path_factory):
    """Two 1-epoch jobs, SGD and AdamW with norms that a group override sets."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "optimizer=sgd,adamw",
        "model/norm=group",
        *data_overrides(cifar_root, cache_dir, train=500, test=200),
        "trainer.epochs=1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    (sweep_dir.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return sweep_dir


@pytest.mark.slow
def test_a_sweep_prints_the_network_and_config_once_and_keeps_them_in_every_run(sweep):
    console = (sweep.parent / "console.txt").read_text()
    assert console.count("Total params: 180,298") == 1  # torchinfo's table
    assert console.count("── trainer") == 1  # the config tree
    assert "wandb: WARNING" not in console  # W&B's variables changed for the second job
    for run in (p for p in sweep.iterdir() if p.is_dir()):
        assert "Total params: 180,298" in (run / "summary.txt").read_text()
        tree = (run / "config_tree.log").read_text()
        assert "├── optimizer" in tree and "epochs: 1" in tree


@pytest.mark.slow
def test_two_job_multirun_gives_two_wandb_runs_in_one_group(sweep):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    # folder names that the project's commands take unquoted: no "=", "," or nesting
    limits = "data.limit_test-200_data.limit_train-500"
    assert [p.name for p in runs] == [
        f"0_{limits}_model-norm-group_optimizer-sgd_trainer.epochs-1",
        f"1_{limits}_model-norm-group_optimizer-adamw_trainer.epochs-1",
    ]
    headers = [next(r["run"] for r in wandb_records(run) if r["type"] == "run") for run in runs]
    groups = {h["run_group"] for h in headers}
    assert len(groups) == 1 and groups.pop()
    names = [h["display_name"] for h in headers]  # the overrides, less where the data lives
    limits = "data.limit_test=200,data.limit_train=500"
    assert names == [
        f"{limits},model/norm=group,optimizer=sgd,trainer.epochs=1",
        f"{limits},model/norm=group,optimizer=adamw,trainer.epochs=1",
    ]
    assert headers[0]["run_id"] != headers[1]["run_id"]
    for run in runs:
        assert len(read_metrics(run)) == 1
        assert any(r["type"] == "exit" for r in wandb_records(run))  # each run finished


@pytest.mark.slow
def test_a_sweep_jobs_folder_is_taken_as_the_readme_writes_it(sweep, cifar_root, cache_dir):
    """python -m cifar_exp.evaluate ckpt=<job>/checkpoints/best.pt and
    python -m cifar_exp.train trainer.resume=<job>, unquoted (once refused by Hydra's parser:
    "mismatched input '='")."""
    job = next(p for p in sweep.iterdir() if p.name.startswith("0_"))
    data = data_overrides(cifar_root, cache_dir, train=10, test=200)[:5]
    run_cli("evaluate", f"ckpt={job}/checkpoints/best.pt", *data, f"hydra.run.dir={job}/eval")
    result = json.loads((job / "eval" / "eval.json").read_text())
    assert result["accuracy"] == pytest.approx(read_metrics(job)[0]["test_acc"], abs=1e-6)
    proc = run_cli("train", f"trainer.resume={job}", "trainer.progress=false")
    assert f"Resuming {job} after epoch 1" in proc.stdout + proc.stderr
    assert len(read_metrics(job)) == 1  # its one epoch was done


def test_evaluate_flips_as_the_checkpoints_run_did_unless_told(smoke_run, cifar_root, cache_dir):
    checkpoint = load(smoke_run / "checkpoints" / "best.pt", option="ckpt")
    data_cfg = compose_train(*data_overrides(cifar_root, cache_dir, train=10, test=200)).data
    data_settings = checked(DataSettings, data_cfg)
    plain_loss = predict_test_set(checkpoint, data_settings)[1].loss  # tested without flips
    flipped_loss = predict_test_set(checkpoint, data_settings, tta="flip")[1].loss
    checkpoint["config"]["trainer"]["test_flip"] = True
    default_loss = predict_test_set(checkpoint, data_settings)[1].loss
    assert default_loss == flipped_loss != plain_loss
    assert predict_test_set(checkpoint, data_settings, tta="none")[1].loss == plain_loss


@pytest.mark.slow
def test_evaluate_without_a_checkpoint_file_is_a_clear_error(tmp_path):
    proc = run_cli("evaluate", f"ckpt={tmp_path / 'missing.pt'}", f"hydra.run.dir={tmp_path}",
                   check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "no such checkpoint file" in proc.stderr + proc.stdout
    assert not (tmp_path / "eval.json").exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_early_stopping_ends_the_run_patience_epochs_after_the_best(
    cifar_root, cache_dir, tmp_path
):
    """The learning rate is 0 after epoch 1 (StepLR, gamma 0) and GroupNorm keeps no running
    statistics, so epoch 2 scores exactly as epoch 1: no improvement (the earlier epoch wins a
    tie), and patience 1 stops the run after epoch 2 of 5."""
    run_cli(
        "train", *data_overrides(cifar_root, cache_dir, train=100, test=100),
        "model/norm=group", "scheduler.lr_scheduler.step_size=1", "scheduler.lr_scheduler.gamma=0",
        "trainer.epochs=5", "trainer.early_stopping.patience=1", "trainer.device=cpu",
        "logger=none", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    first, second = read_metrics(tmp_path)
    assert second["lr"] == 0 and second["test_acc"] == first["test_acc"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] is True and results["epochs"] == 2
    assert results["best_epoch"] == 1
    assert (
        "Stopping early: test_acc has not improved for 1 epochs since epoch 1"
        in (tmp_path / "train.log").read_text()
    )


@pytest.mark.slow
def test_debug_overfit_learns_one_batch_by_heart(cifar_root, cache_dir, tmp_path):
    run_cli(
        "train", "debug=overfit", f"data.root={cifar_root}", "data.format=folder",
        f"data.cache_dir={cache_dir}", "trainer.device=cpu", "trainer.progress=false",
        "logger=none", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 20
    assert metrics[-1]["train_acc"] == 1.0, [m["train_acc"] for m in metrics]
    assert metrics[0]["train_acc"] < 0.5  # it learnt them here
    assert "20 training and 100 test images" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_debug_profile_writes_the_operator_table_and_trace(cifar_root, cache_dir, tmp_path):
    """The preset, on smaller batches (8 steps of 32 instead of 128: quicker here)."""
    run_cli(
        "train", "debug=profile", f"data.root={cifar_root}", "data.format=folder",
        f"data.cache_dir={cache_dir}", "trainer.device=cpu", "trainer.progress=false",
        "logger=none", "data.batch_size=32", "data.limit_train=256", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1]
    table = (tmp_path / "profile.txt").read_text()
    assert "Self CPU time total" in table and "aten::convolution" in table
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")}
    assert steps == {f"ProfilerStep#{n}" for n in range(2, 7)}  # after 2 warm-up steps
    log = (tmp_path / "train.log").read_text()
    assert "Profiled 5 training steps: profile.txt" in log
    assert "256 training and 500 test images" in log
