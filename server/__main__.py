"""``python -m vmcast.server`` runs the `vmcast` command."""

from .cli import main

main()
