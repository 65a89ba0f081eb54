"""The package's user-facing errors, at the bottom of the import graph so every row can raise them.

Every entry point (the ``sae-refusal`` console script, ``python -m sae_refusal``, ``python -m
sae_refusal.cli``) catches :data:`USER_ERRORS` in one handler (:func:`sae_refusal.cli.main`) and prints
:func:`one_line` of the error: ``sae-refusal: error: <message>``, exit status 2, no traceback (``--debug`` or
``SAE_REFUSAL_DEBUG=1`` shows it). A message names the offending config key, flag or file first, then says
what was found and what to do.

* :class:`UserError`: a mistake in what the user asked for (a flag, a config value, a folder).
* :class:`ArtifactError`: a saved artifact that cannot be used as asked: recorded for another model, layer
  or width, altered since it was written (checksum), or holding non-finite values. Names the file.
* :class:`FolderClaimedError`: a job's output folder that another job is writing (or has written).

The classes subclass ``ValueError`` where callers of the library may already catch that.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "ArtifactError",
    "FolderClaimedError",
    "UserError",
    "one_line",
]


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints its message and exits 2 (no traceback)."""


class ArtifactError(UserError, ValueError):
    """A saved artifact that does not fit its use (other model / layer / width, altered, non-finite)."""


class FolderClaimedError(UserError, FileExistsError):
    """An output folder that exists or that another running job has claimed."""


#: Exceptions that reach the user as one line (``SAE_REFUSAL_DEBUG=1`` or ``--debug`` shows the traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    TypeError,
    KeyError,
    LookupError,
    OSError,
    FloatingPointError,
)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a ``KeyError``'s key without its quotes; never empty).

    Chained causes are not repeated: the message must say what the user needs. Line breaks are kept only
    when the message itself is a block (a report a user reads, e.g. several mismatching fields); a message
    that is empty gets the exception's type name.
    """
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    message = message.strip()
    return message or type(err).__name__
