"""Which folder a run's files go to: a fresh one of its own, or the folder of the run it resumes,
and one run at a time in it.

`RunFolders` is a Hydra callback (listed in conf/train.yaml and conf/evaluate.yaml) that
settles the folder before Hydra creates it: a new run gets a folder no other run shares, even
one started in the same second; `trainer.resume` points Hydra at the resumed run's folder (see
`resume`). It then locks the folder (a sweep's folder, and each of its jobs' folders) for as
long as the process runs: a second run into a locked folder stops with one line. The lock is
the operating system's (an flock on the folder's `.lock` file), so it dies with its process and
a killed run leaves no stale lock. What goes into the folder is the run record's
(`track.record`).
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

import filelock
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
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


FOLDER_OPTIONS = "output_root=<folder> or hydra.run.dir=<folder>"


def check_writable(path: Path, options: str = FOLDER_OPTIONS) -> None:
    """Refuse a folder this process cannot create or write in; `options` say how to choose
    another."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".write-test").touch()
        (path / ".write-test").unlink()
    except OSError as err:
        raise UserError(cannot_write(path, err, options)) from None


def cannot_write(path: Path, err: OSError, options: str = FOLDER_OPTIONS) -> str:
    return (
        f"cannot write the folder {path} ({err.strerror or err}); choose a writable place "
        f"with {options}"
    )


LOCK = ".lock"


class FolderInUse(UserError):
    """Another process is running in the folder."""


def lock(folder: Path) -> filelock.BaseFileLock:
    """Hold `folder` for this process (see the module's docstring), or refuse it."""
    held = filelock.FileLock(folder / LOCK, timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        raise FolderInUse(
            f"another run is writing to {folder} (it holds {folder / LOCK}); wait for it to "
            "end, or choose another folder (hydra.run.dir=<folder>, or hydra.sweep.dir for "
            "a sweep)"
        ) from None
    except OSError as err:
        raise UserError(cannot_write(folder, err)) from None
    return held


def in_use(folder: Path) -> bool:
    """Whether a running process holds `folder` (a run that died holds nothing)."""
    if not (folder / LOCK).is_file():
        return False
    probe = filelock.FileLock(folder / LOCK, timeout=0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    except OSError:  # a folder we may not lock: unknown, say not running
        return False
    probe.release()
    return False


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
    """Settle the run (or sweep) folder before Hydra creates it and writes its files, and hold
    it, and each sweep job's folder, while this process runs there."""

    def __init__(self) -> None:
        self.held: dict[str, filelock.BaseFileLock] = {}  # by role: run, sweep, job

    def __getstate__(self) -> dict:
        # Launchers ship the callbacks to the jobs' processes; a lock stays with its process.
        return {**self.__dict__, "held": {}}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        resumed = OmegaConf.select(config, "trainer.resume", default=None)
        with stop_on_error(), read_write(config.hydra), open_dict(config.hydra):
            if distributed.launched_rank() > 0:
                # DDP: rank 0 keeps (and holds) the run folder; the other ranks' Hydra logs go
                # to a throwaway folder, and they take rank 0's run folder when they start.
                config.hydra.run.dir = tempfile.mkdtemp(prefix="cifar_exp-rank-")
                config.hydra.output_subdir = None
                return
            if resumed:
                config.hydra.run.dir = str(resume.run_folder(config))
                # Keep the run's original .hydra record; note this session beside it.
                stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
                config.hydra.output_subdir = f".hydra/resumed-{stamp}"
            elif named_by_user(config, "hydra.run.dir"):
                # evaluate has no output_root: its folder is hydra.run.dir alone
                options = FOLDER_OPTIONS if "output_root" in config else "hydra.run.dir=<folder>"
                check_writable(Path(config.hydra.run.dir), options)
            else:
                config.hydra.run.dir = str(claim_folder(Path(config.hydra.run.dir)))
            self.held["run"] = lock(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with stop_on_error():
            if OmegaConf.select(config, "trainer.resume", default=None):
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
            self.held["sweep"] = lock(Path(config.hydra.sweep.dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep job holds its own folder too: a launcher may run it in another process."""
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            with stop_on_error():
                self.held["job"] = lock(Path(HydraConfig.get().runtime.output_dir))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if job := self.held.pop("job", None):
            job.release()
