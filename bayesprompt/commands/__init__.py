"""The command-line programs, run by `experiments/*.py` and the `bayesprompt-*` scripts."""
