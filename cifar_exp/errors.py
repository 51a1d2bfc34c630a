"""User errors and exit codes: bad input ends with one clear message and a non-zero exit, not
a traceback. HYDRA_FULL_ERROR=1 (Hydra's own debug switch) shows the traceback instead."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("cifar_exp")

USAGE_ERROR = 2
DIVERGED = 3


class UserError(Exception):
    """Something the user can fix: missing data, a bad value, a missing file."""

    exit_code = USAGE_ERROR


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = DIVERGED


def require(module: str, extra: str, what: str) -> None:
    """A UserError naming the extra to install, when `what` needs `module` and it is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"{what} needs the {extra} extra: pip install 'cifar-exp[{extra}]' "
            "(make install installs every extra)"
        )


# What the config or the input files cause: Hydra and OmegaConf raise their own for them.
EXPECTED = (UserError, InstantiationException, OmegaConfBaseException)


def debugging() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_code(err: Exception) -> int:
    return getattr(err, "exit_code", USAGE_ERROR)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn errors caused by the config or the input files into a message and an exit status."""
    try:
        yield
    except EXPECTED as err:
        if debugging():
            raise
        log.error("%s", err)
        raise SystemExit(exit_code(err)) from None
