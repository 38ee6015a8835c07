"""`rscir serve` subcommand(s). Placeholder: filled in by the issue that owns it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands to the rscir parser."""
