"""`python -m cifar_exp.gpucheck --data <CIFAR-10>`: does training on this GPU work, and how
fast is it? One command (`make gpu-check`), about 8 minutes on an H100-class card.

Each step runs the commands a user types, in their own processes, on the data given:

    smoke          one smoke epoch (debug=smoke), uncompiled and compiled
    syncs          how often a training step makes the host wait for the GPU
                   (torch.cuda.set_sync_debug_mode; at most once every CHECK_EVERY steps)
    deterministic  the same deterministic run twice: identical weights
    resume         a deterministic run stopped by SIGTERM after epoch 1 and resumed ends as
                   the run left alone; the same checkpoint also resumes on the CPU
    bench          python -m cifar_exp.bench: images per second, absolute and as ratios
    s9_fast        10 epochs of experiment=s9_fast, compile off and on: time and accuracy
    ddp            2 DDP processes with SyncBatchNorm, compile and bf16 (needs 2 GPUs)

It prints a table and writes it, with the card, driver and versions, as JSON (`--out`). It
needs the package and a copy of CIFAR-10 (`--data`: a folder tree, the official files' folder,
or the .tar.gz of a folder tree), no network. Without a GPU it says so in one line and exits
with status 2; `--device cpu` runs the steps on the CPU, to test this check itself.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_exp.data import datasets
from cifar_exp.engine import preflight
from cifar_exp.engine.build import build
from cifar_exp.engine.compute import seed_everything, unusable_gpu
from cifar_exp.engine.loop import CHECK_EVERY, train_epoch
from cifar_exp.errors import USAGE_ERROR
from cifar_exp.settings import CONF_MODULE
from cifar_exp.track.record import epochs_kept

TIMING = ("epoch_seconds", "images_per_second")
BENCH_VARIANTS = (
    "naive,defaults,defaults_eager,defaults+reduce_overhead,defaults+batch_512,"
    "batched_augment,channels_last,bf16,compile"
)
STOP_TIMEOUT_S = 600  # how long the resume step waits for epoch 1 of its run to end


class StepFailed(Exception):
    """A step's command failed or its result is not what it must be."""


class HostSyncs(TorchDispatchMode):
    """Counts, on the CPU, the calls that make the host wait for a GPU there: values read back
    (item, tolist, a tensor's truth value), results whose size depends on the data (nonzero,
    boolean masks) and tensors made from Python data (copied to the GPU). A stand-in for
    torch.cuda.set_sync_debug_mode where there is no GPU."""

    WAITING = frozenset(
        {"_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "_unique2"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func.overloadpacket.__name__ in self.WAITING:
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncs:
        self.tolist = torch.Tensor.tolist  # reads memory directly, past the dispatcher

        def counted(tensor: torch.Tensor) -> Any:
            self.calls["tolist"] += 1
            return self.tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self.tolist
        super().__exit__(*exc)

    @property
    def count(self) -> int:
        return sum(self.calls.values())


def count_host_syncs(run: Callable[[], object], device: torch.device) -> int:
    """How many times `run()` makes the host wait for `device`: on CUDA as PyTorch's sync
    debug mode sees it, elsewhere as HostSyncs counts."""
    if device.type != "cuda":
        with HostSyncs() as syncs:
            run()
        return syncs.count
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@dataclass
class Check:
    """Where the steps run and on what: the data and device overrides of every training."""

    overrides: list[str]  # data and device, plus the command line's own
    device: str  # cuda, or cpu to test this check
    images: int  # training images of the small runs
    work: Path  # a folder per training
    done: dict[str, dict] = field(default_factory=dict)  # trainings already run, by name

    def train(
        self, name: str, *overrides: str, stop_after_epoch_1: bool = False
    ) -> tuple[int, Path]:
        """`python -m cifar_exp.train` into work/<name>; its exit status and folder. With
        `stop_after_epoch_1`, sent SIGTERM once epoch 1 is kept (`epochs_kept`), as a user
        stopping it then would: it stops after the next step."""
        run_dir = self.work / name
        with (self.work / f"{name}.log").open("a") as log_file:  # a resumed run adds to it
            proc = subprocess.Popen(
                [sys.executable, "-m", "cifar_exp.train", *self.overrides, "logger=none",
                 "trainer.progress=false", f"hydra.run.dir={run_dir}", *overrides],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
            if stop_after_epoch_1:
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while (
                    proc.poll() is None and not epochs_kept(run_dir) and time.monotonic() < deadline
                ):
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)  # nothing, if it has already ended
            return proc.wait(), run_dir

    def run(self, name: str, *overrides: str) -> dict:
        """A training that must succeed (run once per name): its figures, see `summary`."""
        if name not in self.done:
            start = time.perf_counter()
            code, run_dir = self.train(name, *overrides)
            if code != 0:
                raise StepFailed(f"{name} exited {code}: {last_line(self.work / f'{name}.log')}")
            self.done[name] = summary(run_dir, time.perf_counter() - start)
        return self.done[name]

    def small(self, epochs: int = 2) -> list[str]:
        """A small deterministic, uncompiled training."""
        return [
            f"data.limit_train={self.images}", f"data.limit_test={max(self.images // 5, 100)}",
            "data.batch_size=64", f"trainer.epochs={epochs}", "trainer.deterministic=true",
            "trainer.compile=false",
        ]  # fmt: skip


def last_line(log_file: Path) -> str:
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def summary(run_dir: Path, wall: float) -> dict:
    """A finished run's figures: wall time, epoch times (the first holds compilation),
    accuracy; and where it is."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    later = [m["epoch_seconds"] for m in metrics[1:]]
    return {
        "wall_s": wall,
        "first_epoch_s": metrics[0]["epoch_seconds"],
        "later_epoch_s": statistics.median(later) if later else None,
        "train_images_per_s": statistics.median(m["images_per_second"] for m in metrics),
        "best_test_acc": results["best_test_acc"],
        "final_test_acc": results["final_test_acc"],
        "dir": str(run_dir),
    }


def same_run(first: Path, second: Path) -> bool:
    """The same metrics (timing aside) and bit-identical final weights."""

    def metrics(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]

    def weights(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]

    a, b = weights(first), weights(second)
    return (
        metrics(first) == metrics(second)
        and a.keys() == b.keys()
        and all(torch.equal(a[k], b[k]) for k in a)
    )


def smoke(check: Check) -> dict:
    figures = {}
    for compiled in ("false", "true"):
        run = check.run(f"smoke-compile-{compiled}", "debug=smoke", f"trainer.compile={compiled}")
        figures[f"compile_{compiled}"] = run
    return figures


def syncs(check: Check) -> dict:
    """The host's waits over up to 3 * CHECK_EVERY training steps of the default recipe
    (batches of 32), after 3 warm-up steps (compilation, cuDNN's autotuning)."""
    overrides = [*check.overrides, "logger=none", f"data.limit_train={check.images}",
                 "data.limit_test=100", "data.batch_size=32"]  # fmt: skip
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    settings = preflight.check(cfg)
    seed_everything(settings.seed)
    built = build(cfg, settings)
    steps = min(3 * CHECK_EVERY, len(built.loaders.train) - 3)
    batches = iter(built.loaders.train)
    train_epoch(built.learner, itertools.islice(batches, 3))
    device = built.learner.compute.device
    waits = count_host_syncs(
        lambda: train_epoch(built.learner, itertools.islice(batches, steps)), device
    )
    # The loss checks, and the epoch's totals (the image count copied in, the sums read back).
    allowed = math.ceil(steps / CHECK_EVERY) + 2
    if waits > allowed:
        raise StepFailed(f"{waits} waits in {steps} steps, more than the {allowed} allowed")
    return {"steps": steps, "waits": waits, "allowed": allowed}


def deterministic(check: Check) -> dict:
    first = check.run("deterministic-1", *check.small())
    second = check.run("deterministic-2", *check.small())
    if not same_run(Path(first["dir"]), Path(second["dir"])):
        raise StepFailed("two deterministic runs of one config differ")
    return {"identical": True, "final_test_acc": first["final_test_acc"]}


def resume_gpu_on_cpu(check: Check) -> dict:
    whole = check.run("deterministic-1", *check.small())
    code, stopped = check.train("resume-stopped", *check.small(), stop_after_epoch_1=True)
    if code != 128 + signal.SIGTERM:
        detail = last_line(check.work / "resume-stopped.log")
        raise StepFailed(f"the run to stop exited {code}: {detail}")
    if len((stopped / "metrics.jsonl").read_text().splitlines()) != 1:
        raise StepFailed("the stop came after epoch 2 had ended; give more --images")
    on_cpu = check.work / "resume-on-cpu"
    shutil.copytree(stopped, on_cpu)
    resumed = check.run("resume-stopped", f"trainer.resume={stopped}")
    if not same_run(stopped, Path(whole["dir"])):
        raise StepFailed("the stopped and resumed run differs from the run left alone")
    cpu = check.run("resume-on-cpu", f"trainer.resume={on_cpu}", "trainer.device=cpu")
    return {
        "resumed_equals_whole": True,
        "final_test_acc": resumed["final_test_acc"],
        "resumed_on_cpu_final_test_acc": cpu["final_test_acc"],
    }


def throughput(check: Check) -> dict:
    out = check.work / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_exp.bench", "--repeats", "3", "--variants", BENCH_VARIANTS,
         "--out", str(out), *check.overrides, "data.limit_train=10000"],
        capture_output=True, text=True,
    )  # fmt: skip
    (check.work / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StepFailed(f"bench exited {proc.returncode}: {last_line(check.work / 'bench.log')}")
    variants = json.loads(out.read_text())["variants"]
    figures = {
        name: {
            "images_per_s": statistics.median(v["images_per_second"]),
            "ratio_vs_naive": v["ratio_vs_naive"]["median"],
        }
        for name, v in variants.items()
    }
    figures["seed_epoch_50k_s"] = 50_000 / figures["defaults"]["images_per_s"]
    return figures


def s9_fast(check: Check) -> dict:
    return {
        f"compile_{compiled}": check.run(
            f"s9_fast-compile-{compiled}",
            "experiment=s9_fast",
            "trainer.epochs=10",
            f"trainer.compile={compiled}",
        )
        for compiled in ("false", "true")
    }


def ddp(check: Check) -> dict | None:
    if check.device != "cuda" or torch.cuda.device_count() < 2:
        return None
    run_dir = check.work / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cifar_exp.train", *check.overrides,
         "trainer.strategy=ddp", "trainer.sync_batchnorm=true", "trainer.compile=true",
         "trainer.precision=bf16", "debug=smoke", "logger=none", "trainer.progress=false",
         f"output_root={run_dir}"],
        capture_output=True, text=True,
    )  # fmt: skip
    (check.work / "ddp.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StepFailed(f"torchrun exited {proc.returncode}: {last_line(check.work / 'ddp.log')}")
    (folder,) = run_dir.glob("*/*")
    return summary(folder, 0.0)


STEPS: dict[str, Callable[[Check], dict | None]] = {
    "smoke": smoke, "syncs": syncs, "deterministic": deterministic, "resume": resume_gpu_on_cpu,
    "bench": throughput, "s9_fast": s9_fast, "ddp": ddp,
}  # fmt: skip


def run_steps(check: Check, names: list[str]) -> dict[str, dict]:
    """Each step's result (ok, failed or skipped), seconds and figures; a failing step does
    not stop the others."""
    report = {}
    for name in names:
        print(f"gpucheck: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            figures = STEPS[name](check)
            result = "ok" if figures is not None else "skipped"
        except Exception as err:  # noqa: BLE001 - any failure is this step's result
            figures, result = {"error": str(err).strip().splitlines()[0]}, "FAILED"
        report[name] = {"result": result, "seconds": time.perf_counter() - start, **(figures or {})}
    return report


def machine(device: str) -> dict:
    """The card, its driver and the versions the figures were measured with."""
    facts = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    if device != "cuda":
        return {"device": "cpu", **facts}
    smi = shutil.which("nvidia-smi")
    driver = None
    if smi:
        query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or None
    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "gpus": torch.cuda.device_count(),
        "driver": driver,
        **facts,
    }


def brief(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {brief(v)}" for k, v in value.items() if k != "dir") + ")"
    return str(value)


def table(report: dict[str, dict]) -> str:
    lines = [f"{'step':<14} {'result':<8} {'seconds':>8}  figures"]
    for name, step in report.items():
        figures = {k: v for k, v in step.items() if k not in ("result", "seconds")}
        text = "; ".join(f"{k} {brief(v)}" for k, v in figures.items())
        lines.append(f"{name:<14} {step['result']:<8} {step['seconds']:>8.1f}  {text}")
    return "\n".join(lines)


def machine_data_root() -> Path:
    """This machine's data location, as training reads it (CIFAR_DATA or conf/local/)."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return Path(compose("train").data.root)


def data_overrides(path: Path, work: Path) -> list[str]:
    """data.root and data.format for a folder tree, the official files' folder, or an archive
    of either (unpacked into `work`), found before any step is timed."""
    root, fmt = datasets.locate(str(path), "auto", str(work))
    return [f"data.root={root}", f"data.format={fmt}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path,
        help="CIFAR-10: a folder tree, the official files' folder, or a .tar.gz of a folder tree "
        "(default: this machine's data location, CIFAR_DATA or conf/local/, as for training)",
    )  # fmt: skip
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a subset of {', '.join(STEPS)}")
    parser.add_argument("--images", type=int, default=5000, help="training images, small runs")
    parser.add_argument("--work", type=Path, help="default outputs/gpucheck/<time>")
    parser.add_argument("--out", type=Path, help="the JSON report (default <work>/gpucheck.json)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: only to test this check; its figures mean nothing")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training")
    args = parser.parse_args(argv)
    names = args.steps.split(",")
    if unknown := [n for n in names if n not in STEPS]:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpucheck needs a CUDA GPU, and PyTorch sees none here"
            + (f": {unusable_gpu()}" if unusable_gpu() else ""),
            file=sys.stderr,
        )
        raise SystemExit(USAGE_ERROR)
    work = args.work or Path("outputs/gpucheck") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or machine_data_root()
    overrides = [*data_overrides(data, work), f"trainer.device={args.device}", *args.overrides]
    check = Check(overrides, args.device, args.images, work)
    report = {**machine(args.device), "steps": run_steps(check, names)}
    out = args.out or work / "gpucheck.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['device']}, driver {report.get('driver')}, torch {report['torch']}")
    print(table(report["steps"]))
    print(f"written to {out}")
    raise SystemExit(1 if any(s["result"] == "FAILED" for s in report["steps"].values()) else 0)


if __name__ == "__main__":
    main()
