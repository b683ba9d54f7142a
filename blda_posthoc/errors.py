"""The one exception type for bad input or data, shown to the user as ``error: ...``."""


class InputError(ValueError):
    """Bad input or data: the message names the file and the problem, in one line.

    A :class:`ValueError`, so that library users who catch ``ValueError`` for bad arguments
    keep working; code that treats the two apart catches ``InputError`` first.
    """
