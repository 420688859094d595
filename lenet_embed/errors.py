"""The one exception type the package raises for problems a user can fix."""


class LenetEmbedError(Exception):
    """A user-facing error: one line naming the thing at fault and what to do about it.

    The CLI prints the message on stderr and exits with status 1, without a traceback.
    """
