"""Errors a user can cause: the commands print their message as one line and exit with code 2."""

import pickle
import struct
import zipfile

DAMAGED_FILE_ERRORS = (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, struct.error, zipfile.BadZipFile)
"""What a damaged or foreign file raises while torch or numpy reads it: no MemoryError, no bug of ours."""


class UserError(Exception):
    """Bad input from the user (a file, a folder, a value); the message names what and where."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key."""


def first_line(err: BaseException, fallback: str | None = None) -> str:
    """The first line of an error's message, for a one-line report; ``fallback`` (default: the
    error's type name) when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else (fallback if fallback is not None else type(err).__name__)
