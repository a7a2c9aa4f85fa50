"""The one error type for mistakes a user can make (bad path, corrupt file, bad value)."""

from __future__ import annotations


class MedbloomError(Exception):
    """A problem the user can fix: the message names the input and what was expected.

    The CLI prints it on one line and exits with code 2, without a traceback.
    """

    exit_code = 2


class ConfigError(MedbloomError):
    """An experiment setting is out of range or unknown."""


class DataError(MedbloomError):
    """A data file or folder is missing, corrupt or not in the expected format."""


class RecordWriteError(MedbloomError):
    """A run's records could not be written (a full disk, a folder made read-only):
    the message names the file and the cause; the run ends as failed, exit code 1."""

    exit_code = 1

    @classmethod
    def of(cls, path: object, exc: BaseException) -> RecordWriteError | None:
        """The error for writing ``path`` when ``exc`` (or an error it arose from, as
        torch wraps its writer's) is an OSError; None for any other failure."""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, OSError):
                return cls(f"cannot write {path}: {seen.strerror or seen}")
            seen = seen.__cause__ or seen.__context__
        return None
