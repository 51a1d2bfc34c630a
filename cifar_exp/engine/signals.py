"""Ctrl-C (SIGINT), SIGTERM and SIGUSR2 stop training after the current step, not in the middle
of it.

Inside `stop_on_signals()` a signal only sets a flag; the training loop calls
`raise_if_requested` after every step, the run record keeps the weights so far, and the block
ends the process with status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), the
shell's convention. SIGUSR2 is the signal submitit asks SLURM to send before a job's time
limit (and sends itself on preemption); a handler that was there before the block (submitit's,
which requeues the job) is called once the state is saved, and the requeued job resumes in its
folder (`resume.continues`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

# submitit's pre-timeout signal: USR2 unless its SUBMITIT_PREEMPT_SIGNAL names another.
PRE_TIMEOUT = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, PRE_TIMEOUT)
_requested: list[int] = []  # the signals received; module state, as signal handlers are


class Interrupted(Exception):
    """Training stopped on request after a finished step."""

    def __init__(self, signum: int, epoch: int, step: int) -> None:
        self.signum, self.epoch, self.step = signum, epoch, step
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped after epoch {epoch}, step {step}"
        )


def _request_stop(signum: int, frame: FrameType | None) -> None:
    _requested.append(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, the stop signals request a stop instead of killing the process; the
    Interrupted that the stop raises leaves the block as SystemExit(128 + signal), after the
    signal's earlier Python handler (other than Ctrl-C's KeyboardInterrupt) has run."""
    previous = {s: signal.signal(s, _request_stop) for s in STOP_SIGNALS}
    _requested.clear()
    try:
        yield
    except Interrupted as stop:
        handed_on = previous[stop.signum]
        if callable(handed_on) and handed_on is not signal.default_int_handler:
            handed_on(stop.signum, None)  # submitit's: requeues the job and exits
        raise SystemExit(stop.exit_code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_requested(epoch: int, step: int) -> None:
    if _requested:
        raise Interrupted(_requested[0], epoch, step)
