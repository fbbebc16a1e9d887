"""`bayesprompt-train`, the same program: bayesprompt/commands/train.py (`--help`)."""

from bayesprompt.commands.train import cli

if __name__ == "__main__":
    cli()
