"""The one exception type a user can cause; the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input or a bad request: the message is one sentence for the user, never a traceback."""
