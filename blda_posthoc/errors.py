"""The one exception type for bad input or data, shown to the user as ``error: ...``."""


class InputError(Exception):
    """Bad input or data: the message names the file and the problem, in one line."""
