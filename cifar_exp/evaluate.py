"""`python -m cifar_exp.evaluate ckpt=<checkpoint>`: score a saved model on a test set."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_exp import CONF_DIR, checkpoint, data, tracking
from cifar_exp.compute import resolve_compute, resolve_device
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.loop import Predictions, predict
from cifar_exp.optim import evaluated_weights
from cifar_exp.per_class import ClassView
from cifar_exp.validation import Data, Trainer, checked

log = logging.getLogger(__name__)


def predict_test_set(
    state: dict, data_settings: Data, device_name: str = "auto", tta: str | None = None
) -> tuple[data.ImageSet, Predictions]:
    """Run the checkpoint's tested weights (the moving average's, if its run kept one) over
    the test split `data_settings` names, with the test-time views `tta` (None: its training
    run's).

    Returns the test images and the predictions (loss, predicted and true classes, confidences).
    """
    config = state["config"]
    model = instantiate(config["model"])
    model.load_state_dict(evaluated_weights(state))
    # The training run's precision, layout, normalisation and test-time views, so its test
    # accuracy is reproduced exactly (no compiling for one pass).
    chosen = {"tta": tta, "test_flip": None} if tta is not None else {}  # over the old key too
    trainer = checked(Trainer, {**config["trainer"], "compile": False, **chosen}, key="trainer")
    compute = resolve_compute(resolve_device(device_name), trainer)
    # This process alone (no collectives): at a DDP run's end only rank 0 scores its best epoch.
    test_set = data.read(data_settings, "test")
    if test_set.classes != tuple(state["classes"]):
        raise UserError(
            f"test classes {test_set.classes} differ from the model's {tuple(state['classes'])}"
        )
    loader = instantiate(config["augment"]).test_time().loader(
        test_set, batch_size=data_settings.batch_size, shuffle=False, seed=0,
        device=compute.device, num_workers=data_settings.num_workers,
    )  # fmt: skip
    return test_set, predict(compute.prepare(model, alone=True), loader, compute, trainer.tta)


def class_view(
    state: dict, data_settings: Data, device_name: str = "auto", tta: str | None = None
) -> ClassView:
    """The checkpoint's per-class view of the test split `data_settings` names."""
    test_set, predictions = predict_test_set(state, data_settings, device_name, tta)
    return ClassView(test_set, predictions, state["epoch"])


def score(cfg: DictConfig) -> tuple[dict, ClassView]:
    """Accuracy of the checkpoint's model on the test split, overall and per class, and the
    per-class view it comes from."""
    ckpt_path = Path(cfg.ckpt).expanduser()
    state = checkpoint.load(ckpt_path, option="ckpt")
    data_settings = checked(Data, cfg.data, key="data")
    view = class_view(state, data_settings, cfg.device, cfg.tta)
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
    with tracking.start_run(cfg.logger, folder, config, tags=result["trained_by"]["tags"]) as run:
        run.summary.update({k: result[k] for k in ("accuracy", "loss", "images", "epoch")})
        view.log(run)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        result, view = score(cfg)
    folder = Path(HydraConfig.get().runtime.output_dir)
    out = folder / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
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
