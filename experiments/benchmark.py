"""`bayesprompt-benchmark`, the same program: bayesprompt/commands/benchmark.py (`--help`)."""

from bayesprompt.commands.benchmark import cli

if __name__ == "__main__":
    cli()
