"""Project exceptions: each carries a message a user can act on; the CLI prints it on one line."""

from __future__ import annotations


class AutocompressError(Exception):
    """Base class for every error caused by user input or environment, never by a bug.

    The message is kept to one line: line breaks that come from user text (a YAML key, a path) are
    shown escaped, so the CLI's single ``error: ...`` line always names the whole problem."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)


class PlanError(AutocompressError):
    """A plan is malformed, out of range, or made for another model."""


class ProfileError(AutocompressError):
    """A hardware profile is unknown or invalid."""


class ModelLoadError(AutocompressError):
    """A model cannot be loaded (missing, unsupported, unsafe format)."""


class DataError(AutocompressError):
    """Calibration or evaluation text is missing, unreadable or too short."""


class BudgetError(AutocompressError):
    """A budget is malformed or cannot be met by any plan in the search space."""


class SpaceError(AutocompressError):
    """A search-space file is unknown or invalid."""


class StudyError(AutocompressError):
    """A study cannot be created, resumed or read."""


class DeviceError(AutocompressError):
    """A compute device is malformed or not present on this machine (``--device``)."""
