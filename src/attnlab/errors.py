"""Errors that bad input causes, and how the commands report them.

An :class:`InputError` is the user's to fix (a config value, a missing file or folder, an unusable
checkpoint): the commands print it as one ``error: ...`` line on stderr and exit with status 2,
no traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback, as it does for Hydra's own errors.
Anything else is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

#: The exit status of a command stopped by bad input (argparse's, for a usage error).
INPUT_ERROR_STATUS = 2


class InputError(Exception):
    """Bad input; the message says what is wrong and what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the input names does not exist."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside, an :class:`InputError` ends the process with one line on stderr and status 2."""
    try:
        yield
    except InputError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's layout
        print(f"error: {message}", file=sys.stderr)
        sys.exit(INPUT_ERROR_STATUS)
