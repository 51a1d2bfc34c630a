"""`python -m cifar_exp.evaluate ckpt=<checkpoint>`: score a saved model on a test set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cifar_exp import augment, data, models
from cifar_exp.checkpoint import load
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.runner import evaluate, prepare_model, resolve_compute, resolve_device

log = logging.getLogger(__name__)


def predict(
    checkpoint: dict, data_cfg: DictConfig, device_name: str = "auto", flip: bool | None = None
) -> tuple[data.ImageSet, float, torch.Tensor, torch.Tensor]:
    """Run the checkpoint's model over the test split of `data_cfg`, with test-time flips
    if `flip` (None: if its training run tested with them).

    Returns the test images, the mean loss, and the predicted and true class of every image.
    """
    model = models.build(checkpoint["config"]["model"])
    model.load_state_dict(checkpoint["model"])
    # The training run's precision, layout and test-time flips, so its test accuracy is
    # reproduced exactly (no compiling for one pass).
    trainer = checkpoint["config"]["trainer"]
    compute = resolve_compute(resolve_device(device_name), {**trainer, "compile": False})
    if flip is None:
        flip = trainer.get("test_flip", False)

    test_set = data.load(data_cfg, "test")
    trained_classes = tuple(checkpoint["classes"])
    if test_set.classes != trained_classes:
        raise UserError(
            f"test classes {test_set.classes} differ from the model's {trained_classes}"
        )
    loader = data.make_loader(
        test_set,
        augment.BatchAugment(data_cfg.mean, data_cfg.std),
        batch_size=data_cfg.batch_size,
        shuffle=False,
        num_workers=data_cfg.num_workers,
        seed=0,
        device=compute.device,
    )
    loss, predictions, targets = evaluate(prepare_model(model, compute), loader, compute, flip)
    return test_set, loss, predictions, targets


def score(cfg: DictConfig) -> dict:
    """Accuracy of the checkpoint's model on the test split, overall and per class."""
    ckpt_path = Path(cfg.ckpt).expanduser()
    checkpoint = load(ckpt_path, option="ckpt")
    test_set, loss, predictions, targets = predict(checkpoint, cfg.data, cfg.device, cfg.flip)
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
        "epoch": checkpoint["epoch"],
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
