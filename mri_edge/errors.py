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


# import name -> the distribution pip installs it from, where the two differ
PIP_NAMES = {"sklearn": "scikit-learn", "cv2": "opencv-python-headless", "ai_edge_litert": "ai-edge-litert",
             "tflite_runtime": "tflite-runtime"}


class MissingPackageError(MriEdgeError):
    """A Python package that a step needs is not installed (a device install has only the runtime)."""

    def __init__(self, modules: list[str], what: str = "this command"):
        names = ", ".join(PIP_NAMES.get(m, m) for m in modules)
        super().__init__(f"{what} needs {names}, not installed here (pip install 'mri-edge[full]')")


def training_packages() -> tuple[str, ...]:
    """What training and evaluation import: Keras, its back end, scikit-learn and matplotlib."""
    import os  # noqa: PLC0415

    return ("keras", os.environ.get("KERAS_BACKEND") or "tensorflow", "sklearn", "matplotlib")


def installed(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(modules: tuple[str, ...], what: str) -> None:
    """MissingPackageError naming every one of `modules` that cannot be imported, before any work."""
    missing = [m for m in dict.fromkeys(modules) if not installed(m)]
    if missing:
        raise MissingPackageError(missing, what)


def first_line(e: BaseException) -> str:
    """The line of an exception's message that names the cause (its first non-empty one)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
