"""`python -m cifar_exp.bench [--full] [--repeats N] [--variants a,b] [overrides]`:
training throughput.

By default a quick subset (the naive path, the defaults and the main speed options on
`QUICK_IMAGES` training images: minutes on a 2-core CPU); `--full` runs every variant on every
training image (about an hour there).

Measures images per second over whole training epochs, data loading and augmentation
included, for the naive baseline (per-image albumentations in a 2-worker DataLoader, eager
float32, NCHW, batch 128, PyTorch's own layers), the framework's defaults, and each speed
option added to the baseline on its own. The variants run interleaved in one process
(a b c a b c ...), after an untimed warm-up round (round 0), and every figure is a ratio to
the baseline's epoch in the same round: absolute times on a shared machine are noise, paired
ratios much less so. The last line printed is `speedup_vs_naive <median ratio of the defaults>`.
`--profile STEPS` prints instead where each variant's step time goes, operator by operator.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from cifar_exp.engine import preflight, profiling
from cifar_exp.engine.build import BuiltRun, build
from cifar_exp.engine.compute import seed_everything
from cifar_exp.engine.loop import train_epoch
from cifar_exp.errors import exit_on_user_error
from cifar_exp.settings import CONF_MODULE

NAIVE = [
    "augment=s9", "data.num_workers=2", "data.batch_size=128", "trainer.precision=fp32",
    "trainer.channels_last=false", "trainer.compile=false", "trainer.threads=null",
    "trainer.subsampled_convs=false", "trainer.packed_dropout=false",
]  # fmt: skip
# Each variant's overrides on top of the command line's; later ones win.
VARIANTS = {
    "naive": NAIVE,
    "defaults": [],
    "batched_augment": [*NAIVE, "augment=s9_batched"],
    "channels_last": [*NAIVE, "trainer.channels_last=true"],
    "bf16": [*NAIVE, "trainer.precision=bf16"],
    "compile": [*NAIVE, "trainer.compile=true"],
    "subsampled_convs": [*NAIVE, "trainer.subsampled_convs=true"],
    "packed_dropout": [*NAIVE, "trainer.packed_dropout=true"],
    "batch_512": [*NAIVE, "data.batch_size=512"],
    "threads_1": [*NAIVE, "trainer.threads=1"],
    "defaults+compile": ["trainer.compile=true"],
    "defaults+batch_512": ["data.batch_size=512"],
    # On a GPU, where the defaults compile: without it, and with CUDA graphs.
    "defaults_eager": ["trainer.compile=false"],
    "defaults+reduce_overhead": ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"],
}
# The quick benchmark: the options that make the CPU defaults (compiling takes minutes there).
QUICK = ["naive", "defaults", "batched_augment", "bf16", "channels_last", "subsampled_convs",
         "packed_dropout"]  # fmt: skip
QUICK_IMAGES = 5000  # training images per epoch; a data.limit_train override wins


def timed_epoch(built: BuiltRun, batches: int | None) -> float:
    """Images per second over one training epoch (or its first `batches`), waiting for the
    device at both ends."""
    device = built.learner.compute.device
    loader = itertools.islice(built.loaders.train, batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _, _, seen = train_epoch(built.learner, loader)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


Contestant = tuple[BuiltRun, int]


def build_variants(names: list[str], overrides: list[str]) -> dict[str, Contestant]:
    """Each variant's training setup and its CPU thread count."""
    default_threads = torch.get_num_threads()  # before a variant's build sets its own
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        configs: dict[str, DictConfig] = {
            name: compose("train", overrides=[*overrides, *VARIANTS[name], "logger=none"])
            for name in names
        }
    contestants = {}
    for name, cfg in configs.items():
        settings = preflight.check(cfg)
        seed_everything(settings.seed)
        built = build(cfg, settings)
        threads = settings.trainer.threads or default_threads
        contestants[name] = (built, threads)
        compute = built.learner.compute
        print(f"{name}: {compute}, batch {settings.data.batch_size}, {threads} threads", flush=True)
    return contestants


def run(contestants: dict[str, Contestant], overrides: list[str], repeats: int) -> dict:
    """Warm every variant up, then time `repeats` interleaved rounds."""
    per_round: dict[str, list[float]] = {name: [] for name in contestants}
    for round_index in range(repeats + 1):
        for name, (built, threads) in contestants.items():
            torch.set_num_threads(threads)
            # Round 0 warms up (caches, kernels): a few batches, or a whole epoch when
            # compiling, so that the last, smaller batch is compiled before timing too.
            warmup = round_index == 0 and not built.learner.compute.compile
            speed = timed_epoch(built, 3 if warmup else None)
            print(f"round {round_index} {name}: {speed:.0f} images/s", flush=True)
            if round_index:
                per_round[name].append(speed)

    baseline = per_round["naive"]
    device = contestants["naive"][0].learner.compute.device
    results = {}
    for name, speeds in per_round.items():
        ratios = [s / b for s, b in zip(speeds, baseline, strict=True)]
        results[name] = {
            "overrides": VARIANTS[name],
            "compute": str(contestants[name][0].learner.compute),
            "threads": contestants[name][1],
            "images_per_second": speeds,
            "ratio_vs_naive": {
                "min": min(ratios),
                "median": statistics.median(ratios),
                "max": max(ratios),
                "all": ratios,
            },  # fmt: skip
        }
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "train_images": contestants["naive"][0].sizes[0],
        "repeats": repeats,
        "overrides": overrides,
        "variants": results,
    }


def profile(contestants: dict[str, Contestant], steps: int) -> None:
    """Print, for each variant, the operators that took the most time over `steps` training
    steps after 3 untimed ones (torch.profiler, time spent in the operator itself)."""
    for name, (built, threads) in contestants.items():
        torch.set_num_threads(threads)
        timed_epoch(built, 3)
        device = built.learner.compute.device
        with torch.profiler.profile(activities=profiling.activities(device)) as profiler:
            timed_epoch(built, steps)
        print(f"== {name}: {steps} steps", flush=True)
        print(profiling.operator_table(profiler, rows=15), flush=True)


def table(report: dict) -> str:
    lines = [
        f"{report['device']}, torch {report['torch']}, {report['train_images']} training images, "
        f"{report['repeats']} paired rounds",
        f"{'variant':<20} {'median img/s':>12} {'ratio min':>9} {'median':>7} {'max':>7}",
    ]
    for name, result in report["variants"].items():
        ratio = result["ratio_vs_naive"]
        lines.append(
            f"{name:<20} {statistics.median(result['images_per_second']):>12.0f} "
            f"{ratio['min']:>9.2f} {ratio['median']:>7.2f} {ratio['max']:>7.2f}"
        )
    return "\n".join(lines)


def selection(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The variants to run (naive and defaults first) and the overrides for all of them: the
    quick benchmark's image limit unless --full, then the command line's (the data's location
    is the config's, as for training: CIFAR_DATA or conf/local/)."""
    names = ["naive", "defaults"]
    wanted = args.variants.split(",") if args.variants else list(VARIANTS) if args.full else QUICK
    names += [n for n in wanted if n not in names]
    overrides = [] if args.full else [f"data.limit_train={QUICK_IMAGES}"]
    return names, [*overrides, *args.overrides]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `names` (the variants to run) and the overrides of `selection`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"every variant on every training image (default: {', '.join(QUICK)} "
        f"on {QUICK_IMAGES} images)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (naive and defaults always run)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default outputs/bench/<time>.json)")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="STEPS",
        help="instead of timing epochs, print each variant's costliest operators over STEPS steps",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every variant")
    args = parser.parse_args(argv)
    args.names, args.overrides = selection(args)
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown or args.repeats < 1:
        parser.error(f"unknown variants {unknown}" if unknown else "--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_user_error():
        contestants = build_variants(args.names, args.overrides)
        if args.profile:
            profile(contestants, args.profile)
            return
        report = run(contestants, args.overrides, args.repeats)
    out = args.out or Path("outputs/bench") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"written to {out}")
    print(f"speedup_vs_naive {report['variants']['defaults']['ratio_vs_naive']['median']:.2f}")


if __name__ == "__main__":
    main()
