"""``python -m fedilora.flower run APP [CONNECTION] [-c 'key=value'] [--federation-config '...']``

``flwr run`` that fails when the run fails: it submits the run, streams its log, and exits 0 only if
the SuperLink reports the run ``finished:completed`` (``flwr run`` itself exits 0 after submitting,
also when the ServerApp then crashes). Exit 1 with the status details otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

from fedilora.flower.loopback import FlowerRunError, Link, executable, flower_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedilora.flower", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="flwr run, stream the log, exit 1 unless the run completed")
    run.add_argument("app", help="the Flower app folder, e.g. flower-app")
    run.add_argument("connection", nargs="?", help="a [superlink.<name>] of $FLWR_HOME/config.toml")
    run.add_argument("-c", "--run-config", action="append", default=[], help="as for flwr run")
    run.add_argument("--federation-config", help="as for flwr run, e.g. 'num-supernodes=10'")
    run.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="give up after this many seconds")
    args = parser.parse_args(argv)

    home = os.environ.get("FLWR_HOME", str(Path.home() / ".flwr"))
    link = Link(flower_env(home), Path.cwd(), args.connection)
    extra = tuple(item for value in args.run_config for item in ("--run-config", value))
    try:
        run_id = link.submit(args.app, federation_config=args.federation_config, extra=extra)
        print(f"run {run_id} submitted", flush=True)
        stream = subprocess.Popen([executable("flwr"), "log", str(run_id), *link._link, "--stream"], env=link.env)
        try:
            status = link.wait(run_id, timeout=args.timeout, poll=2.0)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stream.wait(10)
            if stream.poll() is None:
                stream.terminate()
    except FlowerRunError as err:
        print(f"fedilora.flower: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"run {run_id} {status['status']} in {status['elapsed']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
