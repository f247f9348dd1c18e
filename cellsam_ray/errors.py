"""Errors a user can act on.

Anything raised as a ``UserError`` is reported by the CLI as one line, ``cellsam-ray: error: ...``, with
a non-zero exit and no traceback. Raise it for bad input (a misspelled channel, a file that is not an
image, a checkpoint with the wrong keys), always before any model time is spent.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class RunFailed(Exception):
    """A run that could not finish (e.g. tiles that failed on every attempt), reported as one line.

    Unlike a ``UserError`` it happens after model time was spent; what did finish is kept, so rerunning
    the same spec retries only what failed.
    """


class RunStopped(RunFailed):
    """A run stopped from outside (SIGTERM from ``cellsam-ray stop`` or the cluster, Ctrl-C): what finished
    is kept, as after a failure."""


@contextmanager
def storage_errors(*, refused: str, unreachable: str) -> Iterator[None]:
    """Turn any failure to reach storage inside the block into a one-line UserError: refused credentials
    as ``"<refused> (<reason>): check the credentials"``, anything else as ``"<unreachable>: <kind>: <reason>"``.
    A UserError raised inside passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except PermissionError as err:
        raise UserError(f"{refused} ({err}): check the credentials") from None
    except Exception as err:  # noqa: BLE001 - any failure to reach the storage is the user's to fix
        raise UserError(f"{unreachable}: {type(err).__name__}: {err}") from None


def one_line(err: BaseException) -> str:
    """An exception as one line, ``"<type>: <first line of its message>"`` (the type alone without a
    message), for messages and reports that must stay one line whatever the exception printed."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
