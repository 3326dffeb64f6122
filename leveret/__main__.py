"""``python -m leveret`` runs the ``leveret`` command line."""

from leveret.consumer.cli import main

main()
