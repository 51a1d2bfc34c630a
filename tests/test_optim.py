"""What updates the weights beside the optimizer's rule: parameter groups, the linear schedule,
the moving average of the weights; and the batched augmentation options of fast recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CPU, MEAN, STD, TINY_BLOCKS, compose_train, data_overrides
from hydra.utils import instantiate

from cifar_exp.data.augment import BatchAugment
from cifar_exp.data.datasets import ImageSet
from cifar_exp.data.loaders import Batching
from cifar_exp.engine import preflight
from cifar_exp.engine.build import WHITEN_EVERY, build
from cifar_exp.engine.learner import Schedule
from cifar_exp.engine.optim import WeightAverage, evaluated_weights, param_groups
from cifar_exp.errors import UserError
from cifar_exp.model.convnet import ConvNet


def test_param_groups_get_the_decay_and_learning_rates_the_config_says(cifar_root, cache_dir):
    cfg = compose_train(
        *data_overrides(cifar_root, cache_dir, train=100, test=20),
        "optimizer.lr=0.05", "optimizer.weight_decay=0.001", "scheduler=linear",
        "param_groups.norm_and_bias.lr_scale=8", "param_groups.norm_and_bias.weight_decay=0",
    )  # fmt: skip
    learner = build(cfg, preflight.check(cfg)).learner
    weights, norm_and_bias = learner.optimizer.param_groups
    assert (weights["initial_lr"], weights["weight_decay"]) == (0.05, 0.001)
    assert (norm_and_bias["initial_lr"], norm_and_bias["weight_decay"]) == (0.4, 0.0)
    # Every trainable parameter in exactly one group: the filters in the first, the rest
    # (BatchNorm scales and shifts, the convolutions' biases) in the other.
    named = {n: p for n, p in learner.model.named_parameters() if p.requires_grad}
    assert len(named) == len(list(learner.model.parameters())) - 1  # the whitened first layer
    ids = {id(p): name for name, p in named.items()}
    first = {ids[id(p)] for p in weights["params"]}
    second = {ids[id(p)] for p in norm_and_bias["params"]}
    assert first | second == set(named) and not first & second
    assert all(named[n].ndim == 4 for n in first) and all(named[n].ndim == 1 for n in second)


def test_one_group_when_norm_and_bias_train_like_the_rest(cifar_root, cache_dir):
    cfg = compose_train(
        *data_overrides(cifar_root, cache_dir, train=100, test=20),
        "param_groups.norm_and_bias.weight_decay=null",  # decay them like the rest (default: 0)
    )
    assert len(build(cfg, preflight.check(cfg)).learner.optimizer.param_groups) == 1


def test_a_scheduler_that_overrides_group_learning_rates_refuses_lr_scale():
    cfg = compose_train("scheduler=onecycle", "param_groups.norm_and_bias.lr_scale=4")
    with pytest.raises(UserError, match="param_groups.norm_and_bias.lr_scale=4.0"):
        preflight.check(cfg)


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = compose_train("scheduler=linear", "trainer.epochs=2", "scheduler.lr_scheduler.warmup=0.2")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.8)
    schedule = Schedule.from_config(cfg.scheduler, optimizer, steps_per_epoch=5)
    rates = []
    for _ in range(10):  # 2 of the 10 steps warm up
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_step()
    expected = [0.8 / 3, 1.6 / 3, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert rates == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_weight_average_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, decay=0.5, every=2)  # the cap is reached at n = 8
    expected = None
    for step in range(1, 25):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        average.after_step(model, step)
        if step % 2 == 0:  # the first update copies; the n-th after it keeps min(0.5, (1+n)/(10+n))
            current = {k: v.clone().float() for k, v in model.state_dict().items()}
            n = step // 2 - 1
            keep = min(0.5, (1 + n) / (10 + n))
            expected = current if expected is None else {
                k: keep * expected[k] + (1 - keep) * current[k] for k in current
            }  # fmt: skip
    averaged = average.module.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(averaged[name], expected[name])
    assert not torch.allclose(averaged["0.weight"], model.state_dict()["0.weight"])
    # A checkpoint's tested weights are the average's, under the model's own names.
    state = {"model": model.state_dict(), "ema": average.state_dict()}
    assert evaluated_weights(state).keys() == model.state_dict().keys()
    torch.testing.assert_close(evaluated_weights(state)["0.weight"], expected["0.weight"])


def test_weight_average_state_survives_a_reload():
    model = ConvNet(TINY_BLOCKS)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.after_step(model, 1)
    restored = WeightAverage(ConvNet(TINY_BLOCKS), decay=0.5)
    restored.load_state_dict(average.state_dict())
    for a, b in zip(restored.module.parameters(), average.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert restored.averaged.n_averaged == restored.updates == 1


def asymmetric_images(n: int = 64) -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageSet(images, np.arange(n) % 10, tuple("abcdefghij"))


def flipped_by_index(augmentation: BatchAugment, images: ImageSet, epoch: int) -> dict:
    """Which images the epoch flips, from a new loader each time (as after a resume)."""
    loader = augmentation.loader(
        images, Batching(batch_size=16, shuffle=True, seed=3, device=CPU.device)
    )
    loader.seed_epoch(3, epoch)
    normalise = BatchAugment(MEAN, STD)
    plain = normalise(torch.from_numpy(images.images).permute(0, 3, 1, 2))
    flips = {}
    for batch_images, _ in loader:
        for image in batch_images:
            matches = [i for i in range(len(plain)) if torch.allclose(image, plain[i].flip(-1))]
            others = [i for i in range(len(plain)) if torch.allclose(image, plain[i])]
            assert len(matches) + len(others) == 1
            flips[(matches or others)[0]] = bool(matches)
    return flips


def test_alternating_flip_flips_each_image_every_other_epoch_and_repeats_after_resume():
    augmentation = BatchAugment(MEAN, STD, alternate_flip=True)
    images = asymmetric_images()
    epochs = [flipped_by_index(augmentation, images, epoch) for epoch in (1, 2, 3)]
    assert all(len(flips) == len(images.labels) for flips in epochs)
    assert all(epochs[0][i] != epochs[1][i] for i in epochs[0])  # every image alternates
    assert epochs[0] == epochs[2]
    assert 0.3 < np.mean(list(epochs[0].values())) < 0.7  # about half each epoch
    assert flipped_by_index(augmentation, images, 2) == epochs[1]  # a new loader: the same


def test_crop_shifts_each_image_by_whole_pixels_within_the_pad():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (400, 3, 32, 32), dtype=np.uint8))
    out = BatchAugment(MEAN, STD, crop_pad=2)(images, torch.Generator().manual_seed(0))
    plain = BatchAugment(MEAN, STD)(images)
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), mode="reflect")
    offsets = []
    for shifted, source in zip(out, padded, strict=True):
        found = [
            (dy, dx) for dy in range(5) for dx in range(5)
            if torch.equal(shifted, source[:, dy : dy + 32, dx : dx + 32])
        ]  # fmt: skip
        assert len(found) == 1
        offsets.append(found[0])
    assert set(offsets) == {(dy, dx) for dy in range(5) for dx in range(5)}  # all 25 shifts


def test_crop_pad_larger_than_the_image_is_refused():
    with pytest.raises(UserError, match="augment.crop_pad=32"):
        BatchAugment(MEAN, STD, crop_pad=32).check(32)


def test_whitened_first_layer_decorrelates_patches_and_is_frozen(cifar_root, cache_dir):
    cfg = compose_train(
        *data_overrides(cifar_root, cache_dir, train=500, test=20), "model.whiten=true"
    )
    settings = preflight.check(cfg)
    built = build(cfg, settings)
    model = built.learner.model
    first = model.features[0][0]
    assert built.params == 180_298 and not first.weight.requires_grad
    assert all(first.weight is not p for g in built.learner.optimizer.param_groups
               for p in g["params"])  # fmt: skip
    # Its first 16 filters map the sampled training images' 3x3 patches to uncorrelated
    # components of unit variance, shrunk by eps for the weaker ones (λ / (λ + eps)); the other
    # 16 are their negatives.
    images = built.loaders.train.images[::WHITEN_EVERY]
    x = BatchAugment(MEAN, STD)(images).double()
    patches = torch.nn.functional.unfold(x, 3).transpose(1, 2).reshape(-1, 27)
    weights = first.weight.detach().double().reshape(32, 27)
    components = patches @ weights[:16].T
    cov = torch.cov(components.T)
    assert torch.allclose(weights[16:], -weights[:16])
    variances = cov.diagonal()
    assert ((variances > 0.5) & (variances <= 1)).all() and variances.max() > 0.999
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-6


def test_whitening_needs_room_for_two_filters_per_patch_dimension():
    with pytest.raises(ValueError, match="at most 54 .*: set model.whiten=false"):
        ConvNet([{"convs": [64], "transition": {"channels": 16}}], whiten=True)


def muon_setup(channels_last: bool, *overrides: str):
    torch.manual_seed(0)
    model = ConvNet(TINY_BLOCKS)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = compose_train("optimizer=muon", "optimizer.lr=0.1", "optimizer.nesterov=true", *overrides)
    groups = param_groups(model, 0.1, 5e-4, lr_scale=2.0, norm_and_bias_decay=0.0)
    return model, instantiate(cfg.optimizer)(groups)


@pytest.mark.parametrize("channels_last", [False, True])
def test_muon_updates_the_filters_as_matrices_and_sgd_the_rest(channels_last):
    model, optimizer = muon_setup(channels_last)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # what torch.optim.Muon does to the filter bank as a matrix
            matrix = torch.nn.Parameter(before[name].flatten(1).clone())
            matrix.grad = grads[name].flatten(1)
            torch.optim.Muon([matrix], lr=0.05, momentum=0.95, nesterov=True,
                             weight_decay=0.0).step()  # fmt: skip
            torch.testing.assert_close(p.detach().flatten(1), matrix.detach())
        else:  # SGD at the norm-and-bias group's lr (0.1 x 2), no decay; Nesterov's first step
            torch.testing.assert_close(p.detach(), before[name] - 0.2 * 1.9 * grads[name])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_muon_can_leave_the_output_layer_to_sgd():
    model, optimizer = muon_setup(False, "optimizer.muon_output_layer=false")
    head = model.classifier.weight
    assert [filters for _, filters in optimizer.matrices] == [
        p for p in model.parameters() if p.ndim >= 2 and p is not head
    ]
    before = head.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    grad = head.grad.clone()
    optimizer.step()
    # SGD at the weights' group's lr (optimizer.lr, 0.1) and decay (optimizer.weight_decay, 0)
    torch.testing.assert_close(head.detach(), before - 0.1 * 1.9 * grad)


def test_muon_views_share_the_filters_memory_and_a_scheduler_drives_both_optimizers():
    model, optimizer = muon_setup(channels_last=True)
    for matrix, filters in optimizer.matrices:
        assert matrix.data_ptr() == filters.data_ptr() and matrix.ndim == 2
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.muon.param_groups] == [0.025]
    assert [g["lr"] for g in optimizer.rest.param_groups] == [0.1]  # 0.1 x 2 x 0.5
    state = optimizer.state_dict()
    _, fresh = muon_setup(channels_last=True)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["rest"]["param_groups"] == state["rest"]["param_groups"]
    assert schedule.get_last_lr() == [0.025, 0.1]


def test_muon_with_fp16_loss_scaling_is_refused():
    with pytest.raises(UserError, match="optimizer=muon cannot train with trainer.precision=fp16"):
        preflight.check(compose_train("optimizer=muon", "trainer.precision=fp16"))
