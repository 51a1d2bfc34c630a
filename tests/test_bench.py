"""The benchmark runs end to end on a tiny setting (its figures are not asserted: see
BENCHMARKS.md), and every speed option trains on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, data_overrides, run_cli

from cifar_exp.engine import preflight
from cifar_exp.engine.compute import Compute, resolve_compute
from cifar_exp.engine.learner import Learner, Schedule
from cifar_exp.engine.loop import train_epoch
from cifar_exp.model.convnet import ConvNet
from cifar_exp.settings import TrainerSettings
from cifar_exp.tools.bench import QUICK, QUICK_IMAGES, VARIANTS, build_variants, parse_args


@pytest.mark.slow
def test_bench_writes_ratios_and_ends_with_the_speedup(cifar_root, cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", "--repeats", "1", "--variants", "bf16", "--out", str(out),
        *data_overrides(cifar_root, cache_dir, 256, 100),
    )  # fmt: skip
    name, value = proc.stdout.strip().splitlines()[-1].split()
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["naive", "defaults", "bf16"]
    assert report["train_images"] == 256 and report["repeats"] == 1
    assert report["variants"]["naive"]["ratio_vs_naive"]["all"] == [1.0]
    defaults = report["variants"]["defaults"]
    assert name == "speedup_vs_naive"
    assert float(value) == pytest.approx(defaults["ratio_vs_naive"]["median"], abs=0.005)
    speeds = [v["images_per_second"][0] for v in report["variants"].values()]
    assert all(s > 0 for s in speeds)


@pytest.mark.slow
def test_bench_profile_shows_where_each_variant_spends_its_steps(cifar_root, cache_dir):
    proc = run_cli(
        "bench", "--profile", "2", "--variants", "packed_dropout",
        *data_overrides(cifar_root, cache_dir, 256, 100),
    )  # fmt: skip
    sections = dict(
        part.split(":", 1) for part in proc.stdout.split("\n== ")[1:]
    )  # name -> its table
    assert list(sections) == ["naive", "defaults", "packed_dropout"]
    assert all("Self CPU time total" in table for table in sections.values())
    # the seed network's dropout: one random number per element in the naive path, none
    # drawn by bernoulli once packed_dropout is on
    assert "aten::bernoulli_" in sections["naive"]
    assert "aten::bernoulli_" not in sections["packed_dropout"]


def test_bench_variants_keep_the_process_threads_unless_they_set_their_own(cifar_root, cache_dir):
    threads = torch.get_num_threads()
    try:
        # threads_1 first: building it sets PyTorch's threads, which must not leak
        contestants = build_variants(
            ["threads_1", "naive", "defaults"], data_overrides(cifar_root, cache_dir, 256, 100)
        )
    finally:
        torch.set_num_threads(threads)
    assert {name: c[1] for name, c in contestants.items()} == {
        "threads_1": 1,
        "naive": threads,
        "defaults": threads,
    }


def test_bench_is_quick_unless_asked_for_the_full_run(monkeypatch):
    monkeypatch.delenv("CIFAR_DATA", raising=False)

    def chosen(*argv: str) -> tuple[list[str], int | None]:
        args = parse_args(list(argv))
        return args.names, compose_train(*args.overrides).data.limit_train

    assert chosen() == (QUICK, QUICK_IMAGES)
    assert chosen("--full") == (list(VARIANTS), None)
    assert chosen("--variants", "compile", "data.limit_train=256") == (
        ["naive", "defaults", "compile"],
        256,
    )  # the command line's limit wins
    assert chosen("--full", "--variants", "bf16") == (["naive", "defaults", "bf16"], None)


@pytest.mark.slow
def test_bench_refuses_an_unknown_variant():
    proc = run_cli("bench", "--variants", "warp_drive", check=False)
    assert proc.returncode == 2 and "unknown variants ['warp_drive']" in proc.stderr


@pytest.mark.parametrize(
    "options",
    [
        dict(precision="fp32", channels_last=False, compile=False),
        dict(precision="bf16", channels_last=True, compile=False),
        dict(precision="fp16", channels_last=False, compile=False),  # with loss scaling
        dict(precision="fp32", channels_last=False, compile=True),
        dict(precision="fp32", channels_last=False, compile=False, subsampled_convs=True),
        dict(precision="bf16", channels_last=True, compile=False, packed_dropout=True),
    ],
)
def test_every_speed_option_trains_on_the_cpu(options):
    trainer = TrainerSettings(
        **{"epochs": 1, "subsampled_convs": False, "packed_dropout": False, **options}
    )
    compute = resolve_compute(torch.device("cpu"), trainer)
    torch.manual_seed(0)
    model = ConvNet([{"convs": [8], "transition": {"channels": 16}}], dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Schedule(torch.optim.lr_scheduler.StepLR(optimizer, 5))
    learner = Learner(
        model, compute.prepare(model), optimizer, schedule, compute.grad_scaler(), compute
    )
    images, labels = torch.randn(64, 3, 32, 32), torch.arange(64) % 10
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(images[:32], labels[:32]), (images[32:], labels[32:])]
    loss, _, seen = train_epoch(learner, batches)
    assert seen == 64 and torch.isfinite(torch.tensor(loss))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    if compute.channels_last:
        assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_compute_follows_the_device(monkeypatch):
    auto = TrainerSettings(epochs=1)  # every option auto, as for a checkpoint older than them
    cpu = resolve_compute(torch.device("cpu"), auto)
    assert not cpu.compile and cpu.subsampled_convs and cpu.packed_dropout
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert cpu.autocast_dtype == (torch.bfloat16 if bf16 else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = resolve_compute(torch.device("cuda"), auto)
    assert cuda == Compute(torch.device("cuda"), torch.bfloat16, True, True)
    off = TrainerSettings(epochs=1, packed_dropout=False)
    assert not resolve_compute(torch.device("cpu"), off).packed_dropout
    defaults = preflight.check(compose_train()).trainer  # the config's own: auto, unless measured
    assert resolve_compute(torch.device("cpu"), defaults) == cpu
