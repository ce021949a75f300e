"""User-facing errors: one line, naming the key or file and what is accepted.

CLIs catch `UserError`, print its message and exit with status 2, so a typo in a config or a missing
file never shows a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input (config, data file, checkpoint, command line)."""
