"""What the console and the figures say: the label-smoothing note, integer epoch ticks, a
"±1 std" band only over several seeds, and one line per failed sweep job."""

from __future__ import annotations

import logging

import pytest
from conftest import compose_train

from cifar_exp.engine import preflight
from cifar_exp.engine.jobs import OPTUNA_SWEEPERS, JobFailed, hide_failed_returns
from cifar_exp.track import plots
from cifar_exp.track.record import smoothing_note


def history(epochs: int, acc: float = 0.5) -> list[dict]:
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    return [{"epoch": e, **dict.fromkeys(keys, acc)} for e in range(1, epochs + 1)]


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plots draw, kept open to be read."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


def test_epoch_ticks_are_whole_numbers(tmp_path, figures):
    plots.plot_curves(history(3), tmp_path / "graphs.png")
    plots.plot_comparison({"a": [history(3)]}, tmp_path / "report.png")
    for fig in figures:
        for ax in fig.axes:
            assert all(float(tick).is_integer() for tick in ax.get_xticks())


def test_the_std_band_is_named_only_over_several_seeds(tmp_path, figures):
    plots.plot_comparison({"a": [history(2)], "b": [history(2)]}, tmp_path / "one.png")
    plots.plot_comparison({"a": [history(2), history(2, 0.6)]}, tmp_path / "two.png")
    titles = [fig.axes[0].get_title() for fig in figures]
    assert titles == ["Test accuracy", "Test accuracy (mean, band: ±1 std over seeds)"]


def test_a_loss_that_label_smoothing_keeps_high_is_explained():
    trainer = preflight.check(compose_train("debug=overfit")).trainer  # label smoothing 0.2
    overfit = (trainer.label_smoothing, 10)
    note = smoothing_note(*overfit, {"train_acc": 1.0, "train_loss": 0.896})
    assert note == (
        "Training accuracy 100.0% with training loss 0.896: label smoothing "
        "(trainer.label_smoothing=0.2) keeps even a perfect prediction's loss at 0.867 or more"
    )
    assert smoothing_note(*overfit, {"train_acc": 0.6, "train_loss": 1.2}) is None
    assert smoothing_note(0.0, 10, {"train_acc": 1.0, "train_loss": 0.01}) is None


@pytest.mark.parametrize("sweeper", OPTUNA_SWEEPERS)
def test_the_optuna_sweepers_wrapper_of_a_failed_job_is_not_shown(sweeper):
    failed = JobFailed("the training loss became nan at epoch 2, step 3", 3)
    wrapped = f"Failed experiment: Return value must be float-castable. Got '{failed}'."
    record = logging.LogRecord(sweeper, logging.WARNING, "", 0, wrapped, None, None)
    assert not hide_failed_returns(record)
    other = logging.LogRecord(sweeper, logging.INFO, "", 0, "Best value: 0.5", None, None)
    assert hide_failed_returns(other)
