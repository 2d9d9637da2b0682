"""The one base class of mri-edge's errors.

Every error that means "bad input" or "unusable file" derives from `MriEdgeError`;
the command line prints its message as one line (no traceback) and exits 1. Stage
modules subclass it so callers can still catch one stage's errors. Standard library
only: the on-device runtime imports it.
"""


class MriEdgeError(Exception):
    """Bad input, an unusable file or a failed gate: a message for the user, not a bug."""


class FileFormatError(MriEdgeError, ValueError):
    """A file that should hold JSON (or another known format) is missing, corrupt or of the wrong shape."""


def first_line(e: BaseException) -> str:
    """The line of an exception's message that names the cause (its first non-empty one)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
