"""The base of every error a user can fix (a bad data path, an unknown model, a broken checkpoint, ...), at the bottom
of the package: it imports nothing from ``microbench``, and every other error a user can fix subclasses it
(``MicroBenchDataError``, ``BackboneError``, ``MergeError``, ``CheckpointError``, ``GenerativeBackendError``)."""

from __future__ import annotations

import contextlib
import sys


class UserError(ValueError):
    """A run is configured in a way that cannot work; the message is one line saying what is wrong and how to fix
    it."""


def user_error_of(err: BaseException | None) -> UserError | None:
    """The user-fixable error behind ``err`` (Hydra's instantiate and Lightning wrap what a target raises), or
    None."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, UserError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a user-fixable error into one ``error:`` line on stderr and exit code 2; anything else propagates."""
    try:
        yield
    except Exception as err:
        cause = user_error_of(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
