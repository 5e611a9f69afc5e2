"""The `hotpath` command line: parser and exit codes (main.py), one module per group."""

from control_plane.cli.main import main

__all__ = ["main"]
