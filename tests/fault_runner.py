"""Fault injection for tests/test_faults.py: `python tests/fault_runner.py SPEC.json`.

Trains a reference run while tracing every write into its folder (each goes through
`cifar_exp.files`), then, for each fault mode and each write in that trace, trains the same
run with the fault at that write, and resumes it with the command a user would type. One
forked child per training: the imports are paid once, and SIGKILL is a real one.

Modes, at write N:
  kill    SIGKILL just before the write (between writes N-1 and N)
  torn    SIGKILL in the middle of it: half the bytes written (to the temporary file of a
          whole-file write, or to the end of an appended line)
  enospc  the disk fills during it: the write raises ENOSPC (for a whole-file write, once
          its temporary file is written)

SPEC: {"overrides": [...], "root": folder, "modes": [...]}. Writes root/outcomes.json:
{"trace": [[kind, path], ...], "cases": [{"mode", "at", "faulted": status, "resumed":
status}]}, a status being the exit code, or -9 for SIGKILL; each run's output is
root/<case>/output.log (the fault) and root/<case>/resume.log.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path
from unittest import mock

from cifar_exp import files
from cifar_exp.train import main as train_main

REAL_WRITE, REAL_APPEND = files.write_atomically, files.append_line


class Faults:
    """Counts the writes into `run_dir` and acts at write `at` as `mode` says."""

    def __init__(self, run_dir: Path, mode: str | None = None, at: int = 0) -> None:
        self.run_dir, self.mode, self.at, self.trace = run_dir.resolve(), mode, at, []

    def reached(self, kind: str, path: Path) -> bool:
        """Note the write; whether it is the one to fault."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.run_dir):
            return False
        self.trace.append([kind, str(path.relative_to(self.run_dir))])
        return len(self.trace) == self.at

    def write_atomically(self, path: Path, data, shared: bool = False) -> None:
        if self.reached("whole", path):
            content = data.encode() if isinstance(data, str) else bytes(data)
            if self.mode == "torn":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                files.tmp_path(path).write_bytes(content[: len(content) // 2])
            if self.mode in ("kill", "torn"):
                os.kill(os.getpid(), signal.SIGKILL)
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with mock.patch.object(files.os, "fsync", side_effect=full):
                return REAL_WRITE(path, data, shared)
        return REAL_WRITE(path, data, shared)

    def append_line(self, path: Path, line: str) -> None:
        if self.reached("append", path):
            if self.mode == "torn":
                with open(path, "a") as f:
                    f.write(line[: len(line) // 2])
            if self.mode in ("kill", "torn"):
                os.kill(os.getpid(), signal.SIGKILL)
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with mock.patch("builtins.open", side_effect=full):
                return REAL_APPEND(path, line)
        return REAL_APPEND(path, line)


def train(
    overrides: list[str], log_file: Path, faults: Faults, trace_file: Path | None = None
) -> int:
    """Train in a forked child with `faults` installed; its exit status (-9: SIGKILL). The
    writes it made go to `trace_file`, if given."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            files.write_atomically, files.append_line = faults.write_atomically, faults.append_line
            sys.argv = ["cifar_exp.train", *overrides]
            train_main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child reports any failure as its status
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            if trace_file:
                trace_file.write_text(json.dumps(faults.trace))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root, overrides = Path(spec["root"]), spec["overrides"]
    reference = root / "reference"
    status = train([*overrides, f"hydra.run.dir={reference}"], root / "reference.log",
                   Faults(reference), root / "trace.json")  # fmt: skip
    assert status == 0, (root / "reference.log").read_text()
    trace = json.loads((root / "trace.json").read_text())
    cases = []
    for mode in spec["modes"]:
        for at in range(1, len(trace) + 1):
            run_dir = root / f"{mode}-{at}"
            command = [*overrides, f"hydra.run.dir={run_dir}"]
            faulted = train(command, root / f"{mode}-{at}.log", Faults(run_dir, mode, at))
            leftovers = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp"))
            # Resume as a user would; a run killed before its first checkpoint is started again.
            again = command if not (run_dir / "checkpoints" / "last.pt").is_file() else [
                *command, f"trainer.resume={run_dir}"]  # fmt: skip
            resumed = train(again, root / f"{mode}-{at}.resume.log", Faults(run_dir))
            cases.append({"mode": mode, "at": at, "write": trace[at - 1], "faulted": faulted,
                          "leftovers": leftovers, "resumed": resumed})  # fmt: skip
    (root / "outcomes.json").write_text(json.dumps({"trace": trace, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
