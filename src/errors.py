"""The one error type users see: bad input, reported by every entry point as one line (no traceback), exit 2."""


class UserInputError(Exception):
    """Bad input from the user: a flag, a file, a combination. The message names it and the fix."""
