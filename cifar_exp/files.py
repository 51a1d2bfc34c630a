"""Writing the files a run keeps: whole or not at all, and a full disk called a full disk.

Every file the project writes into a run folder or a cache goes through `write_atomically` or
`append_line`: the bytes go to `<name>.tmp` beside the file, are flushed to the disk, and
replace the file in one rename, so a crash at any instant leaves the old file or the new one,
never half of one. Serialisers such as torch.save and savefig write into memory first, so that
a failed write raises the OSError that says why. A write that fails (no space, no permission)
removes its temporary file and raises a UserError naming the file and the fix. A temporary
file left by a process killed mid-write is removed by `remove_leftovers` when the next run
opens the folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from cifar_exp.errors import UserError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


class WriteFailed(UserError):
    """A file could not be written: the disk is full, or the place is not writable."""


def write_failed(path: Path, err: OSError) -> WriteFailed:
    """The error for a write of `path` that failed with `err`, with the fix."""
    then = "then run again (a training run continues with trainer.resume=<its run folder>)"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteFailed(
            f"no space left on the device to write {path}: the disk is full. Free some space "
            f"there or write elsewhere (output_root=<folder>), {then}"
        )
    return WriteFailed(
        f"cannot write {path} ({err.strerror or err}); make its folder writable or write "
        f"elsewhere (output_root=<folder>), {then}"
    )


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def write_atomically(path: Path, data: bytes | memoryview | str, shared: bool = False) -> None:
    """Replace `path` with `data` in one step (see the module's docstring). `shared`: the
    folder is not a run's own (a cache several runs write into), so the temporary file is
    this process's alone."""
    content = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}") if shared else tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # the folder may be the trouble
            tmp.unlink(missing_ok=True)
        raise write_failed(path, err) from None


def append_line(path: Path, line: str) -> None:
    """Add one line to a log file such as metrics.jsonl. A crash mid-write can leave a partial
    last line, which its reader sets aside."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as err:
        raise write_failed(path, err) from None


def remove_leftovers(*folders: Path) -> list[Path]:
    """Delete the temporary files a killed write left in `folders` (the run folder's lock
    makes sure no other process is writing them); returns them."""
    leftovers = sorted(p for folder in folders for p in folder.glob(f"*{TMP_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.info(
            "Removed %d temporary file(s) that a killed write left: %s",
            len(leftovers), ", ".join(map(str, leftovers)),
        )  # fmt: skip
    return leftovers
