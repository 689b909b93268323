"""Errors that the CLI turns into one line on stderr and exit code 2."""


class KeyedgeError(Exception):
    """Bad input from the user: a file, a key or an option that cannot be used.

    The message is one line that names the problem; the CLI prints it without a
    traceback and exits with ``exit_code`` (2: bad input).
    """

    exit_code = 2


class KeyFileError(KeyedgeError):
    """A key file that is missing, truncated, tampered with or malformed."""
