"""CLI command groups; each module registers its commands on the root typer app.

Heavy libraries (torch, transformers, flwr) are imported inside the command bodies so that
`federimed --help` stays fast.
"""

import typer
from rich.console import Console

_console = Console()


def fail(message: str) -> typer.Exit:
    """Print `message` as an error and return the exit (status 2) for the caller to raise."""
    _console.print(f"[red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(2)
