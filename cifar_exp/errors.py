"""Bad input ends with one clear message and a non-zero exit, not a traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("cifar_exp")

USAGE_ERROR = 2


class UserError(Exception):
    """Something the user can fix: missing data, a bad value, a missing file."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn errors caused by the config or the input files into a message and exit status 2."""
    try:
        yield
    except (UserError, InstantiationException, OmegaConfBaseException) as err:
        log.error("%s", err)
        raise SystemExit(USAGE_ERROR) from None
