"""Turn the errors a user can fix (bad data path, unknown model, ...) into one line and exit code 2."""

from __future__ import annotations

import contextlib
import sys

from microbench.checkpoints import CheckpointError
from microbench.data.loading import MicroBenchDataError
from microbench.models.backbones.base import BackboneError
from microbench.studies.merging import MergeError


class UserError(ValueError):
    """A run is configured in a way that cannot work (a missing checkpoint, an impossible combination)."""


USER_ERRORS = (MicroBenchDataError, BackboneError, MergeError, CheckpointError, UserError)


def user_error_of(err: BaseException) -> BaseException | None:
    """The user-fixable error behind ``err`` (Hydra's instantiate wraps what a target raises), or None."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, USER_ERRORS):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except Exception as err:
        cause = user_error_of(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
