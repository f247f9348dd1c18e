"""Errors a user can act on.

Anything raised as a ``UserError`` is reported by the CLI as one line, ``cellsam-ray: error: ...``, with
a non-zero exit and no traceback. Raise it for bad input (a misspelled channel, a file that is not an
image, a checkpoint with the wrong keys), always before any model time is spent.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class RunFailed(Exception):
    """A run that could not finish (e.g. tiles that failed on every attempt), reported as one line.

    Unlike a ``UserError`` it happens after model time was spent; what did finish is kept, so rerunning
    the same spec retries only what failed.
    """
