"""`xapi-storage detach`: the subcommand table's entry; the command lives in toolstack/cli.py."""

from .cli import DETACH_HELP as HELP, add_detach_arguments as add_arguments, run_detach as run

__all__ = ["HELP", "add_arguments", "run"]
