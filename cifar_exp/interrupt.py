"""Ctrl-C (SIGINT) and SIGTERM stop training after the current step, not in the middle of it.

Inside `stop_on_signals()` a signal only sets a flag; the training loop calls
`raise_if_requested` after every step, the run record keeps the weights so far, and the block
ends the process with status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), the
shell's convention.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
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
    """Within the block, SIGINT and SIGTERM request a stop instead of killing the process;
    the Interrupted that the stop raises leaves the block as SystemExit(128 + signal)."""
    previous = {s: signal.signal(s, _request_stop) for s in STOP_SIGNALS}
    _requested.clear()
    try:
        yield
    except Interrupted as stop:
        raise SystemExit(stop.exit_code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_requested(epoch: int, step: int) -> None:
    if _requested:
        raise Interrupted(_requested[0], epoch, step)
