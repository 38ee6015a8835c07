"""Subcommand modules of the rscir CLI; each exposes ``register(subparsers)``."""
