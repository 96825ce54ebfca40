"""Errors caused by the user (bad input, bad config): the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix: a missing file, a bad column, an unknown config key."""
