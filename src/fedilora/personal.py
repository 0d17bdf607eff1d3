"""Every client's personalized state under a memory budget: ``PersonalStore``.

A personalized state is ``(rank, lora, extra)``. The store keeps the most recently used states in
RAM up to ``budget_bytes``; past it, the least recently used are spilled to one safetensors file per
state in ``directory`` and read back (memory-mapped, ``safetensors.safe_open``) when asked for.

A state never changes once stored (the round step replaces a client's state, it never edits one), so
a file, once written, holds its state for good: names carry a write counter and are never reused,
and a file is deleted only when no state of the store and no kept checkpoint names it. That lets a
checkpoint name files instead of copying them: ``Snapshot.to_checkpoint`` stores a state held in RAM
inline, as before the store existed (so a run under budget writes the same checkpoints as ever), and
a spilled one as its file (relative to the checkpoint's folder), size and SHA-256, checked when the
run resumes (``PersonalStore.load``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from fedilora.atomic import write_atomically
from fedilora.errors import ConfigError
from fedilora.types import Personal, State

# A state is touched at most twice a round (stored after aggregation, read to evaluate it), so RAM
# buys little beyond the states of a few clients: 16 MiB holds ~45 tiny-model clients (the demo and the
# tests never spill) and keeps a 1000-client run's RSS flat (experiments/bench_memory.py).
DEFAULT_MEMORY_MB = 16


def state_nbytes(*states: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for state in states for t in state.values())


@dataclasses.dataclass(eq=False)
class _Entry:
    """One stored state: its tensors while in RAM, its file once written (both may hold at once)."""

    rank: int
    lora: State | None
    extra: State | None
    nbytes: int
    file: Path | None = None
    sha256: str | None = None


class Snapshot(dict):
    """The store's states at one moment, ``{client: entry}``: references, cheap to take every round."""

    def files(self) -> set[Path]:
        return {e.file for e in self.values() if e.lora is None and e.file is not None}

    def to_checkpoint(self, folder: Path) -> dict[str, dict]:
        """Checkpoint form: a state in RAM inline ``{rank, lora, extra}``; a spilled one
        ``{rank, file, bytes, sha256}`` with ``file`` relative to ``folder`` (the checkpoint's)."""
        out: dict[str, dict] = {}
        for client, entry in self.items():
            if entry.lora is not None:
                out[str(client)] = {"rank": entry.rank, "lora": entry.lora, "extra": entry.extra}
            else:
                out[str(client)] = {
                    "rank": entry.rank,
                    "file": os.path.relpath(entry.file, folder),
                    "bytes": entry.file.stat().st_size,
                    "sha256": entry.sha256,
                }
        return out


class PersonalStore(MutableMapping[int, Personal]):
    """``{client: (rank, lora, extra)}`` holding at most ``budget_bytes`` of tensors in RAM.

    Iteration follows first insertion, as a dict's (replacing a client's state keeps its place).

    Args:
        directory: Where spilled states go (created on the first spill). None: nothing is ever written,
            so only states that already have a file (from a checkpoint) leave RAM.
        budget_bytes: Bytes of tensors kept in RAM; None: no limit (everything stays in RAM).
    """

    def __init__(self, directory: str | Path | None = None, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.directory = Path(directory) if directory is not None else None
        self.budget_bytes = budget_bytes
        self._entries: dict[int, _Entry] = {}
        self._ram: OrderedDict[int, None] = OrderedDict()  # clients whose tensors are in RAM, least recent first
        self.ram_bytes = 0
        self.writes = self.reads = 0  # files written and read back: counts that show spilling ran
        self._garbage: list[Path] = []  # files of replaced states, deleted once no kept checkpoint names them
        self._pinned: dict[str, set[Path]] = {}  # kept checkpoint -> the files of this store it names

    # --------------------------------------------------------------------------------- mapping
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __contains__(self, client: object) -> bool:
        return client in self._entries

    def __getitem__(self, client: int) -> Personal:
        entry = self._entries[client]
        lora, extra = entry.lora, entry.extra
        if lora is None:
            lora, extra = self._read(client, entry)
            entry.lora, entry.extra, entry.nbytes = lora, extra, state_nbytes(lora, extra)
            self.ram_bytes += entry.nbytes
        self._ram[client] = None
        self._ram.move_to_end(client)
        self._evict()
        return entry.rank, lora, extra

    def __setitem__(self, client: int, value: Personal) -> None:
        rank, lora, extra = value
        old = self._entries.get(client)
        if old is not None:
            self._forget(client, old)
        self._entries[client] = _Entry(int(rank), dict(lora), dict(extra), state_nbytes(lora, extra))
        self._ram[client] = None
        self.ram_bytes += self._entries[client].nbytes
        self._evict()

    def __delitem__(self, client: int) -> None:
        self._forget(client, self._entries.pop(client))

    def rank(self, client: int) -> int:
        """A client's rank, without reading its tensors."""
        return self._entries[client].rank

    def in_ram(self) -> list[int]:
        """Clients whose tensors are in RAM, least recently used first."""
        return list(self._ram)

    # ------------------------------------------------------------------------------ spilling
    def _forget(self, client: int, entry: _Entry) -> None:
        if client in self._ram:
            del self._ram[client]
            self.ram_bytes -= entry.nbytes
        if entry.file is not None and self._owns(entry.file):
            self._garbage.append(entry.file)

    def _owns(self, path: Path) -> bool:
        return self.directory is not None and path.parent == self.directory

    def _evict(self) -> None:
        if self.budget_bytes is None:
            return
        for client in list(self._ram):
            if self.ram_bytes <= self.budget_bytes:
                return
            entry = self._entries[client]
            if entry.file is None:
                if self.directory is None:
                    continue  # nowhere to write it: it stays
                self._write(client, entry)
            entry.lora = entry.extra = None
            del self._ram[client]
            self.ram_bytes -= entry.nbytes

    def _write(self, client: int, entry: _Entry) -> None:
        tensors = {f"lora.{k}": v.contiguous() for k, v in entry.lora.items()}
        tensors.update({f"extra.{k}": v.contiguous() for k, v in entry.extra.items()})
        # the key order is kept: some sums (update norms) run over a state's keys in order
        metadata = {"client": str(client), "rank": str(entry.rank), "lora": json.dumps(list(entry.lora)),
                    "extra": json.dumps(list(entry.extra))}  # fmt: skip
        data = safetensors_bytes(tensors, metadata)
        self.writes += 1
        path = self.directory / f"client_{client}.{self.writes}.safetensors"
        write_atomically(path, data)
        entry.file, entry.sha256 = path, hashlib.sha256(data).hexdigest()

    def _read(self, client: int, entry: _Entry) -> tuple[State, State]:
        try:
            with safe_open(entry.file, framework="pt") as handle:
                metadata = handle.metadata()
                lora = {k: handle.get_tensor(f"lora.{k}") for k in json.loads(metadata["lora"])}
                extra = {k: handle.get_tensor(f"extra.{k}") for k in json.loads(metadata["extra"])}
        except Exception as err:  # a file removed or damaged under a running job
            raise ConfigError(
                f"personalized state of client {client}: {entry.file} cannot be read ({type(err).__name__}: {err})"
            ) from None
        for name, value in {**lora, **extra}.items():  # a model that predicts one constant class is never used
            if value.is_floating_point() and not bool(value.isfinite().all()):
                raise ConfigError(
                    f"personalized state of client {client}: {entry.file}: tensor {name} has non-finite values; a "
                    "model with non-finite parameters is refused"
                )
        self.reads += 1
        return lora, extra

    # ---------------------------------------------------------------------------- checkpoints
    def snapshot(self) -> Snapshot:
        return Snapshot(self._entries)

    def pin(self, checkpoint: str, snapshot: Snapshot) -> None:
        """Keep the files ``snapshot`` names while the checkpoint ``checkpoint`` (a path) is kept."""
        self._pinned[checkpoint] = {f for f in snapshot.files() if self._owns(f)}

    def collect(self, kept_checkpoints: Iterable[str]) -> int:
        """Delete the files of replaced states that no kept checkpoint names; returns how many.

        Call it only once no older snapshot is still to be saved (the trainer: after each round's snapshot).
        """
        kept = set(kept_checkpoints)
        self._pinned = {name: files for name, files in self._pinned.items() if name in kept}
        named = set().union(*self._pinned.values())
        removed, garbage = 0, []
        for path in self._garbage:
            if path in named:
                garbage.append(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        self._garbage = garbage
        return removed

    def load(self, personal: Mapping, folder: Path | None = None) -> None:
        """Replace the content with a ``Snapshot`` or a checkpoint's ``personal`` (files relative to
        ``folder``); every file a checkpoint names is checked first (size and SHA-256)."""
        self._entries.clear()
        self._ram.clear()
        self.ram_bytes = 0
        for key, value in personal.items():
            client = int(key)
            if isinstance(value, _Entry):
                entry = dataclasses.replace(value)  # its own copy: each store spills its entries itself
            elif "file" in value:
                path = Path(os.path.normpath(Path(folder or ".", value["file"])))
                check_file(path, value["bytes"], value["sha256"])
                entry = _Entry(int(value["rank"]), None, None, 0, path.absolute(), value["sha256"])  # nbytes: once read
            else:
                lora = {k: v.cpu() for k, v in value["lora"].items()}
                extra = {k: v.cpu() for k, v in value["extra"].items()}
                entry = _Entry(int(value["rank"]), lora, extra, state_nbytes(lora, extra))
            self._entries[client] = entry
            if entry.lora is not None:
                self._ram[client] = None
                self.ram_bytes += entry.nbytes
        self._evict()


def check_file(path: Path, size: int, sha256: str) -> None:
    """One ``ConfigError`` naming ``path`` when it is missing or not the file a checkpoint recorded."""
    if not path.is_file():
        raise ConfigError(
            f"--ckpt_path: the checkpoint names {path} (a client's personalized state), which does not exist"
        )
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    if path.stat().st_size != size or hasher.hexdigest() != sha256:
        raise ConfigError(
            f"--ckpt_path: {path} (a client's personalized state) is damaged: its size or SHA-256 differs from "
            "what the checkpoint recorded"
        )


def personal_store(fabric: Any, spill_to: Path | None, memory_mb: float | None) -> PersonalStore:
    """The store of a run's personalized states: ``memory_mb`` of RAM (None: no limit), then spilled to
    ``spill_to/personal`` (None: never spilled, e.g. when only reading a checkpoint); each process of a
    multi-process run spills its own copy."""
    budget = None if memory_mb is None else int(memory_mb * 2**20)
    directory = None
    if spill_to is not None and budget is not None:
        directory = spill_to / "personal"
        if fabric.world_size > 1:
            directory = directory / f"rank_{fabric.global_rank}"
    return PersonalStore(directory, budget)
