"""Which folder a run's files go to: a fresh one of its own, or the folder of the run it resumes.

`RunFolders` is a Hydra callback (listed in conf/train.yaml) that settles the folder
before Hydra creates it: a new run gets a folder no other run shares, even one started in the
same second; `trainer.resume` points Hydra at the resumed run's folder (see `resume`). What goes
into the folder is the run record's (`track.record`).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifar_exp import distributed
from cifar_exp.engine import resume
from cifar_exp.errors import UserError, exit_on_user_error


def path_safe(overrides: str) -> str:
    """A sweep job's overrides (`model/norm=group,seed=0`) as a folder name that the project's
    commands take unquoted (`model-norm-group_seed-0`): Hydra's override grammar refuses `=`,
    `,` and brackets in a value, and `/` would nest folders."""
    return re.sub(r"[^\w.+@%-]", "-", overrides.replace(",", "_"))


OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)


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
        with stop_on_error(), read_write(config.hydra), open_dict(config.hydra):
            if distributed.launched_rank() > 0:
                # DDP: rank 0 keeps the run folder; the other ranks' Hydra logs go to
                # a throwaway folder, and they take rank 0's run folder when they start.
                config.hydra.run.dir = tempfile.mkdtemp(prefix="cifar_exp-rank-")
                config.hydra.output_subdir = None
            elif config.trainer.get("resume"):
                config.hydra.run.dir = str(resume.run_folder(config))
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
