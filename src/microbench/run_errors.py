"""Turn the errors a user can fix (bad data path, unknown model, ...) into one line and exit code 2."""

from __future__ import annotations

import contextlib
import sys

from microbench.data.loading import MicroBenchDataError
from microbench.models.backbones.base import BackboneError

USER_ERRORS = (MicroBenchDataError, BackboneError)


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
