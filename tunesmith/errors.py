"""Errors meant for people: one line, what is wrong, where, and what to do."""


class UserError(Exception):
    """A mistake in the user's input (flags, files, data). Printed as one line, exit code 2."""

    exit_code = 2
