"""The exception types the CLI turns into a one-line message and a non-zero exit.

Raise `UserError` for anything the user can fix (a bad path, a mistyped config key, an empty dataset);
let programming errors surface as ordinary tracebacks. `UserError` is a `ValueError` and `UserTypeError`
a `TypeError`, so Python callers of the public functions can catch them as the usual kinds of bad argument.
"""


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type (a string where a count belongs), reported like any `UserError`."""
