"""`python -m cifar_exp.evaluate ckpt=<checkpoint>`: score a saved model on a test set."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp import files
from cifar_exp.engine import checkpoint
from cifar_exp.engine.compute import device_problem
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.settings import CONF_PATH, DataSettings, checked
from cifar_exp.track.per_class import ClassView
from cifar_exp.track.tracker import start_run

log = logging.getLogger(__name__)

DATA_LOCATION = ("root", "format")  # taken from the checkpoint unless given on the command line


def trained_data(data: DictConfig, state: dict, overrides: list[str]) -> DictConfig:
    """The `data` config with the training run's data location (data.root, data.format), so
    its test set is found where it trained, unless the command line names another."""
    told = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    trained = state["config"].get("data", {})
    kept = {k: trained[k] for k in DATA_LOCATION if k in trained and f"data.{k}" not in told}
    return OmegaConf.merge(data, kept)


def evaluate_checkpoint(cfg: DictConfig) -> tuple[dict, ClassView]:
    """Accuracy of the checkpoint's model on the test split, overall and per class, and the
    per-class view it comes from."""
    if problem := device_problem("device", cfg.device):
        raise UserError(problem)
    ckpt_path = Path(cfg.ckpt).expanduser()
    state = checkpoint.load(ckpt_path, option="ckpt")
    cfg.data = trained_data(cfg.data, state, list(HydraConfig.get().overrides.task))
    data_settings = checked(DataSettings, cfg.data, key="data")
    view = ClassView.of_checkpoint(state, data_settings, cfg.device, cfg.tta)
    summary = view.summary()
    result = {
        **{k: summary[k] for k in ("accuracy", "loss", "per_class_accuracy", "images", "epoch")},
        "ckpt": str(ckpt_path.resolve()),
        "ckpt_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
        # the training run's W&B id and tags (its configuration id among them)
        "trained_by": {
            "wandb_run_id": state.get("wandb_run_id"),
            "tags": state.get("wandb_tags", []),
        },  # fmt: skip
        "data": {"root": str(cfg.data.root), "format": cfg.data.format},
    }
    return result, view


def track(cfg: DictConfig, folder: Path, result: dict, view: ClassView) -> None:
    """The evaluation as a W&B run of its own (job_type evaluate): the checkpoint's path and
    hash and its training run in the config, the scores in the summary, the per-class view."""
    config = {k: result[k] for k in ("ckpt", "ckpt_sha256", "trained_by", "data")}
    with start_run(cfg.logger, folder, config, tags=result["trained_by"]["tags"]) as tracker:
        tracker.summary.update({k: result[k] for k in ("accuracy", "loss", "images", "epoch")})
        tracker.log_class_view(view)


@hydra.main(config_path=CONF_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    folder = Path(HydraConfig.get().runtime.output_dir)
    out = folder / "eval.json"
    with exit_on_user_error():
        result, view = evaluate_checkpoint(cfg)
        files.write_atomically(out, json.dumps(result, indent=2) + "\n")
        view.write(folder)
        track(cfg, folder, result, view)
    lines = [
        f"{name:>12s}  {100 * acc:6.2f}%" for name, acc in result["per_class_accuracy"].items()
    ]
    log.info(
        "Test accuracy %.2f%% on %d images (loss %.4f)\n%s\nWritten to %s",
        100 * result["accuracy"],
        result["images"],
        result["loss"],
        "\n".join(lines),
        out,
    )
    return result["accuracy"]


if __name__ == "__main__":
    main()
