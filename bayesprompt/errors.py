"""Errors that are the user's to fix: the command line prints them and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong, where we looked and what to do."""


class RunInterrupted(Exception):
    """Ctrl-C during a run: the message says what was kept and how to continue."""
