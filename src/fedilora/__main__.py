"""``python -m fedilora``: the ``fedilora`` command, for an environment without its console script."""

from fedilora.cli import main

main()
