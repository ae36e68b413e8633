"""The one exception type for failures a user can cause (bad input, mismatched files)."""


class LeFusionError(Exception):
    """A user-facing error; the command-line layer prints its message as one line and exits non-zero."""
