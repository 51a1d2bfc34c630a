"""`python -m cifar_exp.evaluate ckpt=<checkpoint>`: score a saved model on a test set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_exp import augment, data
from cifar_exp.checkpoint import load
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.runner import evaluate, resolve_device

log = logging.getLogger(__name__)


def score(cfg: DictConfig) -> dict:
    """Accuracy of the checkpoint's model on the test split, overall and per class."""
    ckpt_path = Path(cfg.ckpt).expanduser()
    checkpoint = load(ckpt_path, option="ckpt")
    model = instantiate(checkpoint["config"]["model"])
    model.load_state_dict(checkpoint["model"])
    device = resolve_device(cfg.device)

    test_set = data.load(cfg.data, "test")
    trained_classes = tuple(checkpoint["classes"])
    if test_set.classes != trained_classes:
        raise UserError(
            f"test classes {test_set.classes} differ from the model's {trained_classes}"
        )
    loader = data.make_loader(
        test_set,
        augment.pipeline(cfg.data.mean, cfg.data.std),
        batch_size=cfg.data.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        seed=0,
    )
    loss, predictions, targets = evaluate(model.to(device), loader, device)
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
