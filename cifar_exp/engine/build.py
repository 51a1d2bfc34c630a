"""What the config names, built in the order that fails cheapest first: the network (measured
against its budget, then on its device, with a resumed run's weights), its optimizer, the data
and its loaders, the schedule. The entry points, the bench and the tests all build here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchinfo
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_exp import distributed
from cifar_exp.data import datasets
from cifar_exp.data.loaders import Batching, Loaders
from cifar_exp.engine import checkpoint, optim
from cifar_exp.engine.compute import resolve_compute, resolve_device
from cifar_exp.engine.learner import Learner, Schedule
from cifar_exp.engine.resume import Resumed
from cifar_exp.errors import EXPECTED, UserError
from cifar_exp.model import budget
from cifar_exp.settings import DataSettings, Settings, call_factory, checked

log = logging.getLogger(__name__)
WHITEN_EVERY = 10  # model.whiten: every 10th training image (5,000 of CIFAR-10) gives the patches


@dataclass
class BuiltRun:
    """Everything the config names, built and ready for the training loop."""

    learner: Learner
    loaders: Loaders
    classes: tuple[str, ...]
    sizes: tuple[int, int]  # training and test images
    params: int
    receptive_field: int
    summary: str  # torchinfo's table of the network


def build(
    cfg: DictConfig,
    settings: Settings,
    ranks: distributed.Ranks | None = None,
    resumed: Resumed | None = None,
) -> BuiltRun:
    """The run that `cfg` (checked as `settings`) configures, for this process's `ranks`,
    continuing the `resumed` checkpoint if given.

    A network outside its budget, or a checkpoint of another network, fails before the data
    is loaded.
    """
    ranks = ranks or distributed.Ranks()
    compute = resolve_compute(
        distributed.rank_device(resolve_device(settings.trainer.device), ranks), settings.trainer
    )
    if settings.trainer.threads:
        torch.set_num_threads(settings.trainer.threads)
    model = instantiate(cfg.model)
    image_shape = settings.image_shape
    params, rf = budget.enforce(model, settings.budget, image_shape)
    log.info("Model: %s parameters, receptive field %d pixels", f"{params:,}", rf)
    # On the CPU before the model moves: torchinfo would otherwise pick a device of its own.
    summary = str(torchinfo.summary(model, input_size=(1, *image_shape), device="cpu", verbose=0))
    if settings.trainer.sync_batchnorm and ranks.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    forward = compute.prepare(model)
    if resumed:
        resumed.restore_model(model)
    norm_and_bias = settings.param_groups.norm_and_bias
    groups = optim.param_groups(
        model, settings.optimizer.lr, settings.optimizer.weight_decay,
        norm_and_bias.lr_scale, norm_and_bias.weight_decay,
    )  # fmt: skip
    optimizer = call_factory("optimizer", instantiate(cfg.optimizer), groups)
    ema = settings.trainer.ema
    average = optim.WeightAverage(model, ema.decay, ema.every) if ema.decay else None

    train_set, test_set = (
        datasets.load(settings.data, "train"),
        datasets.load(settings.data, "test"),
    )
    check_data(train_set, test_set, settings)
    if resumed:
        checkpoint.check_classes(resumed.state, train_set.classes, f"trainer.resume={resumed.path}")
    if settings.model.whiten and not resumed:  # a resumed run's filters are in its checkpoint
        model.whiten_first_layer(normalised(train_set.images[::WHITEN_EVERY], settings.data))
    val_set = None
    if settings.data.val_size:
        train_set, val_set = datasets.hold_out(
            train_set, settings.data.val_size, settings.data.val_seed
        )
    augmentation = instantiate(cfg.augment)
    test_time = augmentation.test_time()
    batching = Batching(
        settings.data.batch_size, settings.seed, compute.device,
        num_workers=settings.data.num_workers,
    )  # fmt: skip
    # Compiled training wants one batch shape: fill the last batch (as many steps, no recompile).
    last_batch = settings.data.last_batch
    if last_batch == "auto":
        last_batch = "fill" if compute.compile else "keep"
    log.info("Last partial training batch: %s (data.last_batch)", last_batch)
    train_batching = replace(batching, shuffle=True, ranks=ranks, last_batch=last_batch)
    loaders = Loaders(
        train=augmentation.loader(train_set, train_batching),
        test=test_time.loader(test_set, batching),
        val=test_time.loader(val_set, batching) if val_set is not None else None,
    )
    schedule = Schedule.from_config(cfg.scheduler, optimizer, len(loaders.train))
    learner = Learner(model, forward, optimizer, schedule, compute.grad_scaler(), compute, average)
    if resumed:
        resumed.restore_training(learner)
    sizes = (len(train_set.labels), len(test_set.labels))
    return BuiltRun(learner, loaders, train_set.classes, sizes, params, rf, summary)


def normalised(images: np.ndarray, data_settings: DataSettings) -> torch.Tensor:
    """uint8 NHWC images as float NCHW, normalised by the data set's mean and std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data_settings.mean, data_settings.std))
    return (x - mean) / std


def budget_refusal(cfg: DictConfig) -> str | None:
    """Why a search trial's network is outside its budget, or None: the network searches'
    hydra.sweeper.trial_check, run on each trial's config before it is launched, without its
    data. Any other fault of the config is left to the trial, whose run reports it."""
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    try:
        settings = checked(Settings, cfg)
        budget.enforce(instantiate(cfg.model), settings.budget, settings.image_shape)
    except budget.OverBudget as err:
        return str(err)
    except EXPECTED:
        pass
    return None


def check_data(
    train_set: datasets.ImageSet, test_set: datasets.ImageSet, settings: Settings
) -> None:
    """What only the loaded data can tell: its classes and image size against the config."""
    if train_set.classes != test_set.classes:
        missing = set(train_set.classes) ^ set(test_set.classes)
        raise UserError(
            f"train and test classes differ (only in one split: {', '.join(sorted(missing))}); "
            "each class needs a folder in both data.root/train and data.root/test"
        )
    num_classes = settings.model.num_classes
    if len(train_set.classes) != num_classes:
        raise UserError(
            f"the data has {len(train_set.classes)} classes ({', '.join(train_set.classes)}) "
            f"but model.num_classes={num_classes}; add the missing class folders or set "
            "model.num_classes"
        )
    shape = train_set.images.shape[1:]
    size, channels = settings.data.image_size, settings.model.in_channels
    if shape != (size, size, channels):
        raise UserError(
            f"the images are {shape[0]}x{shape[1]} with {shape[2]} channels, but the config "
            f"says {size}x{size} (data.image_size) with {channels} (model.in_channels)"
        )
