"""Where a run's files go: a fresh folder of its own, or the folder of the run it resumes.

`RunFolders` is a Hydra callback (listed in conf/train.yaml) that settles the folder before
Hydra creates it: a new run gets a folder no other run shares, even one started in the same
second; `trainer.resume` points Hydra at the resumed run's folder.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifar_exp import checkpoint, distributed
from cifar_exp.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.pt"


def where_it_runs(hydra_cfg: DictConfig) -> list[str]:
    """Settings that do not define the experiment (data location, device, ...).

    They are the keys left out of run names (conf/train.yaml); a resumed run may change them.
    """
    return list(hydra_cfg.job.config.override_dirname.exclude_keys)


def experiment(config: dict, ignored: list[str]) -> dict:
    """The resolved config without the `ignored` dotted keys: what two runs must share."""
    cfg = OmegaConf.create(config)
    for key in ignored:
        *parents, leaf = key.split(".")
        node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    return OmegaConf.to_container(cfg)


def checkpoint_path(resume: str, run_dir: Path) -> Path:
    """The checkpoint `trainer.resume` names: a file as given, else the run's last.pt."""
    path = Path(resume).expanduser()
    return path if resume != "auto" and path.suffix == ".pt" else run_dir / LAST


def run_folder(resume: str) -> Path:
    """The run folder of `trainer.resume=<run folder or checkpoint file>`."""
    path = Path(resume).expanduser()
    if path.suffix == ".pt":
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def find_resumable(root: Path, config: dict, ignored: list[str]) -> Path:
    """The newest run folder under `root` whose checkpoint was trained with `config`."""
    wanted = experiment(config, ignored)
    candidates = sorted(root.rglob(str(LAST)), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True).get("config")
        except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not a match
            continue
        if saved is not None and experiment(saved, ignored) == wanted:
            return path.parent.parent
    raise UserError(
        f"trainer.resume=auto: no run under output_root={root} has a checkpoint with this "
        f"config ({len(candidates)} checkpoints looked at); give the run folder instead "
        "(trainer.resume=<run folder>) or drop trainer.resume to start a new run"
    )


def overridden(overrides: list[str]) -> dict[str, str]:
    """The keys (or groups) that command-line overrides set, with the override text."""
    return {
        o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(overrides)
    }


def check_overrides(overrides: list[str], composed: dict, saved: dict, ignored: list[str]) -> None:
    """A resumed run keeps its saved config: refuse command-line changes to the experiment."""
    for key, text in overridden(overrides).items():
        if key in ignored:
            continue
        new = OmegaConf.select(OmegaConf.create(composed), key, default=None)
        old = OmegaConf.select(OmegaConf.create(saved), key, default=None)
        if OmegaConf.is_config(new):
            new, old = OmegaConf.to_container(new), OmegaConf.to_container(old or {})
        if new != old:
            raise UserError(
                f"trainer.resume continues a run with its saved config, but the command line "
                f"changes {key} (saved: {old}, given: {new}); drop {text} "
                "or start a new run"
            )


def claim_folder(base: Path) -> Path:
    """Create a new, empty folder at `base`, or at `base`-2, -3, ... if that exists.

    mkdir is atomic, so two runs never get the same folder.
    """
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError(cannot_write(path, err)) from None
    raise UserError(f"cannot find a free run folder name next to {base}")


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".write-test").touch()
        (path / ".write-test").unlink()
    except OSError as err:
        raise UserError(cannot_write(path, err)) from None


def cannot_write(path: Path, err: OSError) -> str:
    return (
        f"cannot write the run folder {path} ({err.strerror or err}); choose a writable "
        "place with output_root=<folder> (or hydra.run.dir=<folder>)"
    )


def named_by_user(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


@contextlib.contextmanager
def stop_on_error() -> Iterator[None]:
    """Hydra turns a callback's exception into a warning and runs on: stop the run instead."""
    try:
        with exit_on_user_error():
            yield
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None


class RunFolders(Callback):
    """Settle the run (or sweep) folder before Hydra creates it and writes its files."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with stop_on_error():
            resume = config.trainer.get("resume")
            with read_write(config.hydra), open_dict(config.hydra):
                if distributed.launched_rank() > 0:
                    # DDP: rank 0 keeps the run folder; the other ranks' Hydra logs go to
                    # a throwaway folder, and they take rank 0's run folder when they start.
                    config.hydra.run.dir = tempfile.mkdtemp(prefix="cifar_exp-rank-")
                    config.hydra.output_subdir = None
                elif resume:
                    config.hydra.run.dir = str(self.resumed_folder(config, resume))
                    # Keep the run's original .hydra record; note this session beside it.
                    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
                    config.hydra.output_subdir = f".hydra/resumed-{stamp}"
                elif named_by_user(config, "hydra.run.dir"):
                    check_writable(Path(config.hydra.run.dir))
                else:
                    config.hydra.run.dir = str(claim_folder(Path(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with stop_on_error():
            if config.trainer.get("resume"):
                raise UserError(
                    "trainer.resume works on one run at a time: resume each job of a sweep "
                    "with trainer.resume=<its folder>"
                )
            with read_write(config.hydra), open_dict(config.hydra):
                # A sweeper that keeps its study (optuna's storage) continues in its folder.
                if named_by_user(config, "hydra.sweep.dir") or config.hydra.sweeper.get("storage"):
                    check_writable(Path(config.hydra.sweep.dir))
                else:
                    config.hydra.sweep.dir = str(claim_folder(Path(config.hydra.sweep.dir)))

    @staticmethod
    def resumed_folder(config: DictConfig, resume: str) -> Path:
        ignored = where_it_runs(config.hydra)
        job = OmegaConf.to_container(
            OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True
        )
        if resume == "auto":
            return find_resumable(Path(config.output_root), job, ignored)
        folder = run_folder(resume)
        saved = checkpoint.load(checkpoint_path(resume, folder))["config"]
        check_overrides(list(config.hydra.overrides.task), job, saved, ignored)
        return folder
