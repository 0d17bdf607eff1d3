"""A Flower federation on 127.0.0.1 started and stopped by this process: a SuperLink and SuperNodes.

For the tests, the benchmark and ``python -m fedilora.flower``. Every process runs in its own session and is
stopped by its process group (the SuperNode's SuperExec and ClientApp processes go with it), so nothing is
left running, also when the caller fails. ``flwr run`` returns 0 even when the run crashed: ``wait``
reads the run's status from the SuperLink and raises ``FlowerRunError`` with its logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONNECTION = "fedilora"


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish with ``completed`` (status details and the run's log attached)."""


def flower_env(home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: no dependency installation, telemetry or update check
    (the SuperLink would ``uv sync`` a CUDA torch; there is no network), ``FLWR_HOME`` at ``home``, and
    this interpreter's ``bin`` first on ``PATH`` (the SuperExec starts ``flwr-clientapp`` by name)."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; install fedilora[flower]")
    return str(path)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def group_alive(self) -> bool:
        """Whether any process of the group is left (zombies not yet reaped included)."""
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (a SuperNode unregisters), then SIGKILL what is left after ``grace``,
        and wait until the group is gone."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.signal_group(signal.SIGKILL)  # children (SuperExec, ClientApps, workers) of a leader that exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        deadline = time.monotonic() + 10  # orphans are reaped by init: give it a moment
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Link:
    """Runs on a SuperLink through the ``flwr`` CLI: submit, status, logs, wait for the end.

    Args:
        env: The environment of the ``flwr`` calls (``FLWR_HOME`` holds the connection).
        cwd: Working directory of the ``flwr`` calls.
        connection: The ``[superlink.<name>]`` connection of ``$FLWR_HOME/config.toml``.
    """

    def __init__(self, env: dict[str, str], cwd: Path | None = None, connection: str | None = CONNECTION) -> None:
        self.env, self.cwd, self.connection = env, cwd, connection

    @property
    def _link(self) -> list[str]:
        """The connection argument of ``flwr`` commands (none: the default of ``config.toml``)."""
        return [self.connection] if self.connection else []

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [executable("flwr"), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def submit(
        self,
        app: str | os.PathLike,
        run_config: dict[str, Any] | None = None,
        federation_config: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> int:
        """``flwr run`` (not streamed); returns the run id. ``run_config`` goes through a TOML file so that
        any string survives the shell-free ``key=value`` parsing of ``-c``; ``extra``: more ``flwr run``
        arguments (e.g. ``-c 'key=value'``)."""
        import tomli_w  # comes with flwr

        args = ["run", str(app), *self._link, "--format", "json", *extra]
        if federation_config:
            args += ["--federation-config", federation_config]
        with tempfile.TemporaryDirectory() as tmp:
            if run_config:
                path = Path(tmp) / "run_config.toml"
                path.write_text(tomli_w.dumps(run_config))
                args += ["--run-config", str(path)]
            done = self.flwr(*args)
        try:
            reply = json.loads(done.stdout[done.stdout.index("{") :])
            return int(reply["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FlowerRunError(f"flwr run failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None

    def status(self, run_id: int) -> dict[str, Any]:
        done = self.flwr("ls", *self._link, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(done.stdout[done.stdout.index("{") :])["runs"][0]
        except (ValueError, KeyError, IndexError):
            raise FlowerRunError(f"flwr ls failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), *self._link, "--show").stdout

    def wait(self, run_id: int, timeout: float = 600.0, poll: float = 1.0, max_poll: float = 30.0) -> dict[str, Any]:
        """Block until the run finishes; its status, or ``FlowerRunError`` unless it completed.

        Each status check is a ``flwr ls`` process, which spends about 1.3 s of CPU importing flwr: checked
        every second, it took most of a core from a federation on the same machine (and from the rounds
        a benchmark times). So the interval doubles from ``poll`` to ``max_poll``, and a check is made at
        once when ``ended`` says the SuperLink logged the end of the run's task.
        """
        deadline = time.monotonic() + timeout
        interval, due, hinted = poll, time.monotonic(), False
        while True:
            hint = not hinted and self.ended(run_id)
            if hint or time.monotonic() >= due:
                hinted = hinted or hint
                status = self.status(run_id)
                if status["status"].startswith("finished"):
                    break
                if time.monotonic() > deadline:
                    self.flwr("stop", str(run_id), *self._link)
                    raise FlowerRunError(
                        f"run {run_id} still {status['status']} after {timeout:.0f} s\n{self.logs(run_id)[-6000:]}"
                    )
                interval = poll if hinted else min(2 * interval, max_poll)  # after the hint the end is near
                due = time.monotonic() + interval
            time.sleep(0.2)
        if status["status"] != "finished:completed":
            raise FlowerRunError(
                f"run {run_id} {status['status']}: {status.get('status-details', '')}\n{self.logs(run_id)[-6000:]}"
            )
        return status

    def ended(self, run_id: int) -> bool:
        """Whether the run's end shows without asking the SuperLink (a remote one: never)."""
        return False

    def run(
        self,
        app: str | os.PathLike,
        run_config: dict[str, Any] | None = None,
        federation_config: str | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        return self.wait(self.submit(app, run_config, federation_config), timeout)


@dataclass
class Federation(Link):
    """A SuperLink on a free loopback port (``simulation``: with the simulation engine) and SuperNodes.

    Use as a context manager; ``close`` stops every process it started. ``workdir`` holds ``FLWR_HOME``
    (with the ``[superlink.fedilora]`` connection) and one log file per process.
    """

    workdir: Path
    simulation: bool = False
    cwd: Path | None = None
    port: int = 0
    processes: list[Process] = field(default_factory=list)
    _log_offset: int = 0  # how far ``ended`` has read the SuperLink's log
    _log_lines: str = ""

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        Link.__init__(self, flower_env(self.home), self.cwd, CONNECTION)
        # a private temporary directory (Ray's and the keep-alive workers' sockets), removed by ``close``;
        # short, because a Unix socket path has at most 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="flwr-"))
        self.env["TMPDIR"] = str(self.tmp)

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str]) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_superlink(self, timeout: float = 120.0) -> Process:
        self.port = free_port()
        args = [executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.simulation:
            args.append("--simulation")
        link = self._spawn("superlink", args)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not link.alive():
                raise FlowerRunError(f"flower-superlink exited with code {link.popen.returncode}:\n{link.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                    if response.status == 200:
                        return link
            except OSError:
                pass
            time.sleep(0.3)
        raise FlowerRunError(f"flower-superlink not ready after {timeout:.0f} s:\n{link.tail()}")

    def add_supernode(self, node_config: dict[str, Any], name: str | None = None) -> Process:
        """A SuperNode with ``--node-config`` built from ``node_config`` (values as TOML: strings quoted)."""
        if not self.port:
            raise RuntimeError("start the SuperLink first")
        pairs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
        args = [
            executable("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            pairs,
        ]
        return self._spawn(name or f"supernode{len(self.processes)}", args)

    def ended(self, run_id: int) -> bool:
        """The SuperLink we started logs ``Finished task T of run R`` when the run's ServerApp task ends
        (read from where the last call stopped: the log grows with every message)."""
        link = next((p for p in self.processes if p.name == "superlink"), None)
        if link is None:
            return False
        try:
            with link.log.open("rb") as log:
                log.seek(self._log_offset)
                new = log.read()
        except OSError:
            return False
        self._log_offset += len(new)
        self._log_lines = self._log_lines[-200:] + new.decode(errors="replace")  # a line cut in two is whole next time
        return re.search(rf"Finished task \d+ of run {run_id}(?!\d)", self._log_lines) is not None

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
