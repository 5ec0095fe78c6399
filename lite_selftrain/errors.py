"""The one exception type the CLI turns into a one-line message and a non-zero exit.

Raise `UserError` for anything the user can fix (a bad path, a mistyped config key, an empty dataset);
let programming errors surface as ordinary tracebacks.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
