"""Errors a user can cause: the CLIs print their message as one line and exit with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a folder, a value); the message names what and where."""
