"""``python -m fedilora.cli``: the ``fedilora`` command (as ``python -m fedilora``)."""

from fedilora.cli import main

main()
