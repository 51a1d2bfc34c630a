"""`python -m cifar_exp.evaluate ckpt=<checkpoint>`: score a saved model on a test set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_exp import checkpoint, data
from cifar_exp.compute import resolve_compute, resolve_device
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.loop import predict
from cifar_exp.optim import evaluated_weights
from cifar_exp.validation import Data, Trainer, checked

log = logging.getLogger(__name__)


def predict_test_set(
    state: dict, data_settings: Data, device_name: str = "auto", tta: str | None = None
) -> tuple[data.ImageSet, float, torch.Tensor, torch.Tensor]:
    """Run the checkpoint's tested weights (the moving average's, if its run kept one) over
    the test split `data_settings` names, with the test-time views `tta` (None: its training
    run's).

    Returns the test images, the mean loss, and the predicted and true class of every image.
    """
    config = state["config"]
    model = instantiate(config["model"])
    model.load_state_dict(evaluated_weights(state))
    # The training run's precision, layout, normalisation and test-time views, so its test
    # accuracy is reproduced exactly (no compiling for one pass).
    chosen = {"tta": tta, "test_flip": None} if tta is not None else {}  # over the old key too
    trainer = checked(Trainer, {**config["trainer"], "compile": False, **chosen}, key="trainer")
    compute = resolve_compute(resolve_device(device_name), trainer)
    test_set = data.load(data_settings, "test")
    if test_set.classes != tuple(state["classes"]):
        raise UserError(
            f"test classes {test_set.classes} differ from the model's {tuple(state['classes'])}"
        )
    loader = instantiate(config["augment"]).test_time().loader(
        test_set, batch_size=data_settings.batch_size, shuffle=False, seed=0,
        device=compute.device, num_workers=data_settings.num_workers,
    )  # fmt: skip
    loss, predictions, targets = predict(compute.prepare(model), loader, compute, trainer.tta)
    return test_set, loss, predictions, targets


def score(cfg: DictConfig) -> dict:
    """Accuracy of the checkpoint's model on the test split, overall and per class."""
    ckpt_path = Path(cfg.ckpt).expanduser()
    state = checkpoint.load(ckpt_path, option="ckpt")
    data_settings = checked(Data, cfg.data, key="data")
    test_set, loss, predictions, targets = predict_test_set(
        state, data_settings, cfg.device, cfg.tta
    )
    correct = predictions == targets
    per_class = {
        name: correct[targets == i].float().mean().item() for i, name in enumerate(test_set.classes)
    }
    return {
        "accuracy": correct.float().mean().item(),
        "loss": loss,
        "per_class_accuracy": per_class,
        "images": len(targets),
        "ckpt": str(ckpt_path.resolve()),
        "epoch": state["epoch"],
        "data": {"root": str(cfg.data.root), "format": cfg.data.format},
    }


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        result = score(cfg)
    out = Path(HydraConfig.get().runtime.output_dir) / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
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
