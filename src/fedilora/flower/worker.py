"""A SuperNode's keep-alive worker: the client runtime (imports, parsed config, data, frozen backbone)
kept in one process across messages.

A deployed SuperNode of Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message
(``--isolation subprocess`` and ``process`` alike), so a client would import torch, lightning and
open_clip and rebuild its model every round. With ``--node-config '... keep-alive=600'`` the ClientApp
hands each message, on plain data, to this worker over a Unix socket in a private directory
(``multiprocessing.connection`` with a random key in a 0600 file) and returns its reply; the first
message starts the worker. The worker exits after ``keep-alive`` idle seconds or when the SuperNode's
SuperExec (the ClientApp's parent) is gone; it stays in the SuperNode's process group, so stopping the
group stops it. Nothing leaves the node: Flower still carries every message between SuperLink and node.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

START_TIMEOUT = 900.0  # seconds a first message waits for the worker to import and listen


def _private_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"fedilora-flower-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of this user that nobody else can read")
    return path


def _paths(node_id: int) -> tuple[Path, Path, Path, Path]:
    base = _private_dir() / f"node-{node_id}"
    return base.with_suffix(".sock"), base.with_suffix(".key"), base.with_suffix(".lock"), base.with_suffix(".log")


def _connect(sock: Path, keyfile: Path) -> Connection | None:
    try:
        return Client(str(sock), family="AF_UNIX", authkey=keyfile.read_bytes())
    except (OSError, EOFError):  # no worker, a stale socket, or one shutting down
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def call(request: dict[str, Any], node_id: int, keep_alive: float) -> dict[str, Any]:
    """``client_work.handle(request)`` in this node's worker, started if none is listening."""
    sock, keyfile, lockfile, logfile = _paths(node_id)
    with lockfile.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per node
        connection = _connect(sock, keyfile)
        if connection is None:
            sock.unlink(missing_ok=True)
            keyfile.unlink(missing_ok=True)
            with logfile.open("ab") as log:
                args = ["--node-id", str(node_id), "--keep-alive", str(keep_alive), "--watch", str(os.getppid())]
                worker = subprocess.Popen(
                    [sys.executable, "-m", "fedilora.flower.worker", *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while connection is None:
                if worker.poll() is not None:
                    raise RuntimeError(f"the keep-alive worker exited with code {worker.returncode}; see {logfile}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the keep-alive worker did not listen within {START_TIMEOUT:g} s; see {logfile}"
                    )
                time.sleep(0.1)
                if sock.exists() and keyfile.exists():
                    connection = _connect(sock, keyfile)
    with connection:
        connection.send(request)
        answer = connection.recv()
    if answer["status"] != "ok":
        raise RuntimeError(answer["error"])
    return answer["reply"]


def serve(node_id: int, keep_alive: float, watch: int) -> None:
    from fedilora.flower.client_work import handle  # the heavy imports, once for the worker's life

    sock, keyfile, _, _ = _paths(node_id)
    key = secrets.token_bytes(32)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    listener = Listener(str(sock), family="AF_UNIX", authkey=key)
    state = {"last": time.monotonic(), "busy": False}

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            idle = not state["busy"] and time.monotonic() - state["last"] > keep_alive
            if idle or not _alive(watch):
                with contextlib.suppress(OSError):
                    sock.unlink()
                    keyfile.unlink()
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"fedilora keep-alive worker of node {node_id}: pid {os.getpid()}, {sock}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError):  # a client that failed authentication or went away
            continue
        with connection:
            state["busy"] = True
            try:
                request = connection.recv()
                try:
                    answer = {"status": "ok", "reply": handle(request)}
                except Exception as err:  # the ClientApp turns it into a Flower error reply
                    traceback.print_exc()
                    answer = {"status": "error", "error": f"{type(err).__name__}: {err}"}
                connection.send(answer)
            except (OSError, EOFError):
                pass
            finally:
                state["busy"], state["last"] = False, time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--keep-alive", type=float, required=True)
    parser.add_argument("--watch", type=int, required=True, help="exit when this process is gone")
    args = parser.parse_args()
    serve(args.node_id, args.keep_alive, args.watch)


if __name__ == "__main__":
    main()
