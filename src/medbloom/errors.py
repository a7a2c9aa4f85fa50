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
