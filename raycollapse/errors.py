"""The one exception type for mistakes a user can fix.

The CLI prints its message (no traceback) and exits with status 2. Every message names what is
wrong and how to fix it.
"""


class UserInputError(ValueError):
    """Bad input from a user: a path, a value, a config key. The message says how to fix it."""
