"""`bayesprompt-analyze`, the same program: bayesprompt/commands/analyze.py (`--help`)."""

from bayesprompt.commands.analyze import cli

if __name__ == "__main__":
    cli()
