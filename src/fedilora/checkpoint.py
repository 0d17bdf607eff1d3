"""Checkpoints of federated runs: atomic writes through Fabric, safe and verified loading.

A checkpoint is one file ``<log_dir>/checkpoints/round-NNNN.ckpt`` written with ``fabric.save`` to a
temporary name and renamed into place, so a crash never leaves a half-written checkpoint under the
real name. It holds only tensors and plain Python values and is read back with
``weights_only=True``: loading never unpickles arbitrary objects. A SHA-256 digest of the content
is stored inside and checked on load, so a damaged file is refused even where it still unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric

from fedilora.errors import ConfigError

FORMAT = "fedilora-checkpoint-v1"
_NAME = re.compile(r"round-(\d+)\.ckpt$")


def checkpoint_path(log_dir: Path, completed_rounds: int) -> Path:
    return log_dir / "checkpoints" / f"round-{completed_rounds:04d}.ckpt"


def _digest(value: Any, hasher: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(f"K{key}".encode())
            _digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, hasher)
    else:
        hasher.update(f"V{value!r}".encode())


def digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor's bytes and every value of ``state``."""
    hasher = hashlib.sha256()
    _digest(state, hasher)
    return hasher.hexdigest()


def save_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: Fabric writes a temporary file on rank 0, which is renamed into place."""
    content = {**state, "format": FORMAT}
    content["digest"] = digest(content)
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    fabric.save(tmp, content)
    if fabric.is_global_zero:
        os.replace(tmp, path)
    fabric.barrier()


def load_checkpoint(fabric: Fabric, path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint; any problem is one ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt_path: checkpoint {path} does not exist")
    try:
        content = fabric.load(path, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcodes, refused globals: all mean a bad file
        raise ConfigError(
            f"--ckpt_path: {path} is not a readable fedilora checkpoint (truncated or corrupted: "
            f"{type(err).__name__}); earlier checkpoints in the same folder are untouched"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ConfigError(f"--ckpt_path: {path} is not a {FORMAT} file")
    stored = content.pop("digest", None)
    if stored != digest(content):
        raise ConfigError(f"--ckpt_path: {path} is corrupted (its content does not match its SHA-256 digest)")
    return content


def find_last(root_dir: str | Path, name: str) -> Path:
    """The checkpoint with the most completed rounds under ``root_dir/name/version_*/checkpoints``."""
    found = []
    for path in Path(root_dir, name).glob("version_*/checkpoints/round-*.ckpt"):
        match = _NAME.search(path.name)
        if match:
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    if not found:
        raise ConfigError(f"--ckpt_path last: no checkpoint under {Path(root_dir, name)}/version_*/checkpoints")
    return max(found)[2]


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints of ``directory``."""
    checkpoints = sorted(p for p in directory.glob("round-*.ckpt") if _NAME.search(p.name))
    for old in checkpoints[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What differs between the run that wrote a checkpoint and this one, or None."""
    for key in current:
        if saved.get(key) != current[key]:
            theirs = json.dumps(saved.get(key))[:200]
            ours = json.dumps(current[key])[:200]
            return f"{key}: checkpoint has {theirs}, this config has {ours}"
    return None
