"""The run record: one writer of the run folder, one decision of "best"."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BLOCKS, RecordingTracker, make_learner, make_record

from cifar_exp.engine import checkpoint
from cifar_exp.engine.resume import Resumed
from cifar_exp.engine.signals import Interrupted
from cifar_exp.model.convnet import ConvNet
from cifar_exp.track.record import RunFacts, RunRecord, best_epoch, history_until, read_metrics


def epoch(n, test_acc, val_acc, test_loss=1.0):
    return {"epoch": n, "train_loss": 1.0, "train_acc": 0.5, "test_loss": test_loss,
            "test_acc": test_acc, "lr": 0.1, "epoch_seconds": 2.0 * n,
            "images_per_second": 100.0, "val_loss": 1.0, "val_acc": val_acc}  # fmt: skip


# Validation is best at epoch 2, the test set at epoch 3.
HISTORY = [epoch(1, 0.30, 0.40), epoch(2, 0.50, 0.70), epoch(3, 0.60, 0.65)]


def keep_all(run_dir, monitor):
    record = make_record(run_dir, monitor=monitor, epochs=3)
    learner = make_learner(ConvNet(TINY_BLOCKS))
    for metrics in HISTORY:
        record.end_epoch(dict(metrics), learner)
    return record, learner


@pytest.mark.parametrize(("monitor", "best"), [("val_acc", 2), ("test_acc", 3), ("test_loss", 1)])
def test_the_monitored_metric_chooses_best_pt_and_the_results(tmp_path, monitor, best):
    record, _ = keep_all(tmp_path, monitor)
    best_pt = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best_pt["epoch"] == best and best_pt["history"] == HISTORY[:best]
    assert best_pt["monitor"] == {
        "metric": monitor, "best_epoch": best, "best_value": HISTORY[best - 1][monitor]
    }  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["state"] == "running"  # until `finish`
    assert results["monitor"] == monitor and results["best_epoch"] == best
    assert results["best_test_acc"] == HISTORY[best - 1]["test_acc"]  # the chosen model's
    assert results["final_test_acc"] == 0.60 and results["epochs"] == 3
    assert results["mean_epoch_seconds"] == pytest.approx(4.0)
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["epoch"] == 3
    assert read_metrics(tmp_path / "metrics.jsonl") == (HISTORY, [])
    assert not list(tmp_path.glob("**/*.tmp"))


def test_ties_keep_the_earlier_epoch():
    history = [epoch(1, 0.5, 0.5), epoch(2, 0.5, 0.5)]
    assert best_epoch(history, "test_acc")["epoch"] == 1
    assert best_epoch(history, "test_loss")["epoch"] == 1


def test_an_interrupted_checkpoint_holds_the_best_so_far(tmp_path):
    """The stop path once read a history that fit never returned: best -1.0."""
    record, learner = keep_all(tmp_path, "test_acc")
    record.keep_interrupted(learner, Interrupted(15, epoch=4, step=7))
    stopped = checkpoint.load(tmp_path / "checkpoints" / "interrupted.pt")
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) == (4, 7)
    assert stopped["monitor"] == last["monitor"] == {
        "metric": "test_acc", "best_epoch": 3, "best_value": 0.60
    }  # fmt: skip
    assert torch.equal(stopped["model"]["classifier.weight"], last["model"]["classifier.weight"])


def test_a_rank_that_does_not_write_keeps_the_history_only(tmp_path):
    record = RunRecord(tmp_path / "run", RunFacts(), RecordingTracker(), writes=False)
    record.end_epoch(dict(HISTORY[0]), make_learner(ConvNet(TINY_BLOCKS)))
    assert record.history == HISTORY[:1]
    assert not (tmp_path / "run").exists()


def test_a_damaged_metrics_line_is_skipped_not_a_reason_to_drop_later_ones(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1}\n{"epo\x00ch": 2\n{"epoch": 3}\n[4]\n{"epoch": 4}\n{"epo')
    epochs, damaged = read_metrics(metrics)
    assert epochs == [{"epoch": 1}, {"epoch": 3}, {"epoch": 4}]
    assert damaged == ['{"epo\x00ch": 2', "[4]", '{"epo']
    assert history_until(metrics, 4) == [{"epoch": 1}]  # epoch 2 is gone: the run stops there
    assert metrics.read_text().endswith('{"epo')  # read only


def resume_at(record_dir, name="last.pt") -> Resumed:
    path = record_dir / "checkpoints" / name
    state = checkpoint.load(path)
    return Resumed(path, state, state["config"])


def test_resume_rewrites_best_pt_when_the_run_died_before_writing_it(tmp_path):
    """Killed between last.pt and best.pt of its best epoch: last.pt holds the best weights."""
    _, learner = keep_all(tmp_path, "test_acc")  # best: epoch 3, the last
    checkpoints = tmp_path / "checkpoints"
    stale = make_record(tmp_path / "other", epochs=3)
    stale.end_epoch(dict(HISTORY[0]), learner)
    (checkpoints / "best.pt").write_bytes(
        (tmp_path / "other" / "checkpoints" / "best.pt").read_bytes()
    )
    (checkpoints / "best.pt.tmp").write_bytes(b"half a checkpoint")
    record = make_record(tmp_path, epochs=3)
    record.history = list(HISTORY)
    record.start(learner, resume_at(tmp_path))
    assert checkpoint.load(checkpoints / "best.pt")["epoch"] == 3
    assert (checkpoints / "best.pt").read_bytes() == (checkpoints / "last.pt").read_bytes()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_resume_sets_damaged_metrics_lines_aside_and_keeps_best_pt(tmp_path, caplog):
    """A damaged line never drops the epochs after it nor replaces best.pt with a worse one."""
    _, learner = keep_all(tmp_path, "val_acc")  # best: epoch 2
    best_before = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:30] + "\x00garbage"
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    record = make_record(tmp_path, monitor="val_acc", epochs=3)
    resumed = resume_at(tmp_path)
    record.history = resumed.state["history"]
    record.start(learner, resumed)
    assert read_metrics(tmp_path / "metrics.jsonl") == (HISTORY, [])
    assert (tmp_path / "metrics.damaged.jsonl").read_text() == lines[1] + "\n"
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == best_before
    assert "1 damaged line(s)" in caplog.text


@pytest.mark.parametrize(("patience", "stops"), [(None, False), (1, True), (2, False)])
def test_early_stopping_counts_the_epochs_since_the_best(tmp_path, patience, stops):
    """val_acc is best at epoch 2 of 3: one epoch without improvement."""
    record = RunRecord(
        tmp_path, RunFacts(monitor="val_acc", epochs=5, config={}, patience=patience),
        RecordingTracker(),
    )  # fmt: skip
    learner = make_learner(ConvNet(TINY_BLOCKS))
    for metrics in HISTORY[:2]:
        record.end_epoch(dict(metrics), learner)
        assert not record.stops_early
    record.end_epoch(dict(HISTORY[2]), learner)
    assert record.stops_early is stops
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] is stops and results["epochs"] == 3
    # Patience that runs out with the last epoch stops nothing.
    record.facts = RunFacts(monitor="val_acc", epochs=3, config={}, patience=patience)
    assert not record.stops_early


class SearchTrial:
    """Stands in for the optuna Trial of a pruned search (checked end to end in
    test_search.py): keeps what it is told, and prunes when `prunes` says."""

    number = 7

    def __init__(self, prunes):
        self.prunes, self.reports, self.asked = prunes, [], 0

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        self.asked += 1
        return self.prunes


@pytest.mark.parametrize(
    ("monitor", "epochs", "patience", "told"),
    [
        # val_acc at the best test_acc's epoch; epoch 3 is the last one
        ("test_acc", 3, None, [0.40, 0.70, 0.65]),
        # val_acc is best at epoch 2: with patience 1 the run stops early after epoch 3
        ("val_acc", 5, 1, [0.40, 0.70, 0.70]),
    ],
)
def test_a_search_trial_is_told_the_value_so_far_and_judges_no_epoch_that_ends_the_run(
    tmp_path, monitor, epochs, patience, told
):
    trial = SearchTrial(prunes=False)
    facts = RunFacts(monitor=monitor, optimized_metric="val_acc", epochs=epochs, config={},
                     patience=patience)  # fmt: skip
    record = RunRecord(tmp_path, facts, RecordingTracker(), trial=trial)
    learner = make_learner(ConvNet(TINY_BLOCKS))
    for metrics in HISTORY:
        record.end_epoch(dict(metrics), learner)
    assert trial.reports == list(zip([1, 2, 3], told, strict=True))
    assert trial.asked == 2 and not record.pruned  # epochs 1 and 2, not epoch 3


def test_a_pruned_run_ends_with_the_state_pruned_its_epochs_and_a_tag(tmp_path, caplog):
    trial, tracker = SearchTrial(prunes=True), RecordingTracker()
    facts = RunFacts(monitor="val_acc", optimized_metric="val_acc", epochs=3, config={})
    record = RunRecord(tmp_path, facts, tracker, trial=trial)
    learner = make_learner(ConvNet(TINY_BLOCKS))
    record.end_epoch(dict(HISTORY[0]), learner)
    assert record.pruned and not record.stops_early
    with caplog.at_level("INFO"):
        record.end_pruned()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["state"], results["epochs"], results["planned_epochs"]) == ("pruned", 1, 3)
    assert results["best_val_acc"] == 0.40 and tracker.tags == ["pruned"]
    assert "Pruned by the search after epoch 1/3 (trial 7): best val_acc 0.4000" in caplog.text
