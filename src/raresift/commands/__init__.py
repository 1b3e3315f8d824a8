"""CLI subcommands, one module per group; each module has ``register(subparsers)``."""
