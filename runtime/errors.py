"""Typed errors with messages written for the person who will read them.

Every user-facing failure raises a subclass of :class:`EdgefmError`. The CLI prints ``str(error)`` (one
paragraph: what went wrong, which file or argument, what to do) and exits non-zero without a traceback.
This module is pure Python so that every layer (models, export, runtime) can share it.
"""

from __future__ import annotations


class EdgefmError(Exception):
    """Base class of every error edgefm reports to a user."""


class CheckpointError(EdgefmError):
    """A checkpoint is missing, unreadable, of another variant, or has missing/unexpected keys."""


class BundleError(EdgefmError):
    """A bundle folder, its manifest or one of its component files is missing, corrupt or inconsistent."""


class ManifestError(BundleError):
    """manifest.json does not follow the schema."""


class InputError(EdgefmError):
    """A user input (image, prompt, feed array, argument) is invalid."""


class BackendError(EdgefmError):
    """A backend is unknown, not installed, or failed to load or run a component."""


class ParityError(EdgefmError):
    """An exported component misses the parity policy against PyTorch."""


class MissingExtraError(EdgefmError):
    """An optional dependency (an extra of the edgefm distribution) is not installed."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install the extra with: pip install 'edgefm[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, purpose) from exc
