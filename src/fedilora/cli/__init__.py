"""``fedilora <command>`` and ``python -m fedilora``: the entry point.

The commands are listed once, in :mod:`fedilora.cli.commands`. ``fit``, ``export`` and ``validate`` are
LightningCLI subcommands (:mod:`fedilora.cli.lightning`); the others run their module's ``main``
(:data:`RUNNERS`)."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

from fedilora.checkpoint import Stopped
from fedilora.cli.commands import COMMANDS, EXTERNAL
from fedilora.cli.lightning import METHODS, FediLoRACLI
from fedilora.errors import ConfigError, RunFailed

__all__ = ["COMMANDS", "EXTERNAL", "METHODS", "FediLoRACLI", "main"]

#: the module whose ``main(argv)`` runs each command of ``EXTERNAL`` (imported when the command runs; named
#: here and not in the command table, see :mod:`fedilora.cli.commands`)
RUNNERS = {"compare": "fedilora.compare", "predict": "fedilora.predict"}


def _config_error_in(err: BaseException) -> ConfigError | None:
    """The ConfigError that ``err`` was raised from, following the cause/context chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: Any = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in EXTERNAL:  # e.g. compare: its own options, runs `fit` for each method
        return importlib.import_module(RUNNERS[argv[0]]).main(argv[1:])
    try:
        FediLoRACLI(args=args)
    except ConfigError as err:
        print(f"fedilora: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFailed as err:
        print(f"fedilora: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as err:  # jsonargparse wraps a ConfigError raised in a list item's __init__ (a callback)
        cause = _config_error_in(err)
        if cause is None:
            raise
        print(f"fedilora: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the trainer saved the last completed round
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"fedilora: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        raise SystemExit(128 + signum) from None
