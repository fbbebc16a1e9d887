"""Errors that are the user's to fix: the command line prints them and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong, where we looked and what to do."""


class RunsFailed(Exception):
    """Some runs of a sweep failed, the others finished: the message lists the failed ones
    and says how to resume; the command line exits with code 1."""


class RunInterrupted(Exception):
    """Ctrl-C during a run: the message says what was kept and how to continue."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error (message), its type when empty, for a one-paragraph message.

    Library errors can be long: HDF5 prints a whole stack, PyTorch a list of parameter names.
    """
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
