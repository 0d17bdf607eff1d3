"""Checkpoints of federated runs: atomic writes through Fabric, safe and verified loading, resume checks.

A checkpoint is one file ``<log_dir>/checkpoints/round-NNNN.ckpt`` written with ``fabric.save``
through ``BesideTargetCheckpointIO``: a temporary file next to the target, renamed into place, so a
crash never leaves a half-written checkpoint under the real name, and a killed process leaves its
temporary file where the next start finds and removes it. It holds only tensors and plain Python
values and is read back with ``weights_only=True``: loading never unpickles arbitrary objects. A
SHA-256 digest of the content is stored inside and checked on load, so a damaged file is refused
even where it still unpickles.

A checkpoint also holds a fingerprint of the run: its configuration (every option of the trainer,
model and data, flattened to ``trainer.seed``-style keys), a digest of the data it trained on, and
the adapter shapes. A resume is refused when any of these differ, except for the options in
``MAY_CHANGE_ON_RESUME``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric import Fabric
from lightning.fabric.plugins import TorchCheckpointIO

from fedilora.atomic import write_atomically
from fedilora.errors import ConfigError

log = logging.getLogger("fedilora")

FORMAT = "fedilora-checkpoint-v2"
# v1 fingerprinted ranks, clients, model name, aggregator and shapes only: a resume from it cannot be
# checked against the whole configuration, so it is refused rather than trusted
_OLD_FORMATS = ("fedilora-checkpoint-v1",)
FINGERPRINT_VERSION = 2
_NAME = re.compile(r"round-(\d+)\.ckpt")
_VERSION = re.compile(r"version_(\d+)")
_TEMPORARY = re.compile(r"\.round-\d+\.ckpt(?:\.(\d+))?\.tmp")  # without a pid: written by fedilora < v2

# Options that do not change what a run computes, so a resume may change them: where the logs go, how
# often to evaluate, checkpoint and show progress, how much RAM the personalized states take (spilled
# ones read back are bit-for-bit the same), and which hardware runs it (several processes give the
# single-process result up to float tolerance). ``trainer.rounds`` may grow, not shrink below the
# rounds completed (checked on its own). Precision changes the numbers and is fingerprinted.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "trainer.rounds",
        "trainer.eval_every",
        "trainer.checkpoint_every",
        "trainer.keep_last",
        "trainer.personal_memory_mb",
        "trainer.progress",
        "trainer.root_dir",
        "trainer.name",
        "trainer.accelerator",
        "trainer.devices",
        "trainer.strategy",
        "trainer.num_nodes",
        "data.eval_batch_size",
        "data.num_workers",
    }
)
_MAY_CHANGE_LEAVES = frozenset({"cache_dir", "cache_size", "num_workers"})  # caches and loader workers, at any depth


def checkpoint_path(log_dir: Path, completed_rounds: int) -> Path:
    return log_dir / "checkpoints" / f"round-{completed_rounds:04d}.ckpt"


# ------------------------------------------------------------------------------------ writing
class BesideTargetCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target's folder, then renames it into place.

    Lightning's own atomic save stages the file under ``$TMPDIR`` (an fsspec transaction): a process
    killed there leaves a file nobody cleans, and a ``PermissionError`` at its final move is swallowed,
    so the caller later sees "No such file or directory" instead of the real cause.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))


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
    """Write ``state`` atomically on rank 0 (``fabric.save`` through ``BesideTargetCheckpointIO``)."""
    content = {**state, "format": FORMAT}
    content["digest"] = digest(content)
    if not isinstance(fabric.strategy.checkpoint_io, BesideTargetCheckpointIO):
        fabric.strategy.checkpoint_io = BesideTargetCheckpointIO()
    fabric.save(path, content)


def remove_stale_temporaries(fabric: Fabric, root_dir: str | Path, name: str) -> list[Path]:
    """Delete the temporary checkpoint files that killed runs of ``root_dir/name`` left behind.

    A file whose writer (the pid in its name) still runs is kept: it may be a checkpoint in progress.
    """
    removed: list[Path] = []
    if not fabric.is_global_zero:
        return removed
    for path in sorted(Path(root_dir, name).glob("version_*/checkpoints/.round-*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (match.group(1) is not None and _running(int(match.group(1)))):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
            fabric.print(f"removed {path}, a partial checkpoint left by a run that was killed while writing it")
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ------------------------------------------------------------------------------------ reading
def load_checkpoint(fabric: Fabric, path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint; any problem is one ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise ConfigError(f"--ckpt_path: checkpoint {path} {what}")
    try:
        content = fabric.load(path, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcodes, refused globals: all mean a bad file
        raise ConfigError(
            f"--ckpt_path: {path} is not a readable fedilora checkpoint (truncated, corrupted or not a checkpoint: "
            f"{type(err).__name__}); earlier checkpoints in the same folder are untouched"
        ) from None
    found = content.get("format") if isinstance(content, dict) else None
    if found in _OLD_FORMATS:
        raise ConfigError(
            f"--ckpt_path: {path} was written by an earlier fedilora ({found}) whose checkpoints do not record the "
            "whole configuration, so a resume from it cannot be checked; start a new run, or finish this one with "
            "the fedilora version that wrote it"
        )
    if found != FORMAT:
        raise ConfigError(f"--ckpt_path: {path} is not a {FORMAT} file")
    stored = content.pop("digest", None)
    if stored != digest(content):
        raise ConfigError(f"--ckpt_path: {path} is corrupted (its content does not match its SHA-256 digest)")
    for part in ("global_lora", "global_extra", "base_weights"):  # the model states a run resumes or exports
        check_finite(content.get(part) or {}, f"--ckpt_path: {path}", part)
    for client, state in (content.get("personal") or {}).items():  # in-checkpoint ones; spilled files on load
        for part in ("lora", "extra"):
            check_finite(state.get(part) or {}, f"--ckpt_path: {path}", f"personal[{client}].{part}")
    return content


def check_finite(tensors: Mapping[str, Any], where: str, part: str = "") -> None:
    """Refuse a model state with a NaN or infinite value: one ``ConfigError`` naming ``where`` (the file)
    and the tensor. Such a model predicts one constant class; it must never be evaluated as a result."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            tensor = f"{part}[{name}]" if part else name
            raise ConfigError(
                f"{where}: tensor {tensor} has {kind} values; a model with non-finite parameters is refused"
            )


def find_last(root_dir: str | Path, name: str) -> Path:
    """The newest checkpoint of the most recent run of ``name``: the highest ``version_N`` that has one.

    Never a checkpoint of an older run with more rounds: that would continue another experiment.
    """
    runs = []
    for folder in Path(root_dir, name).glob("version_*"):
        match = _VERSION.fullmatch(folder.name)
        if match and folder.is_dir():
            runs.append((int(match.group(1)), folder))
    for _, folder in sorted(runs, reverse=True):
        newest = newest_checkpoint(folder)
        if newest is not None:
            return newest
    raise ConfigError(f"--ckpt_path last: no checkpoint under {Path(root_dir, name)}/version_*/checkpoints")


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of ``run_dir`` (a ``version_N`` folder) with the most rounds, or None."""
    found = []
    for path in Path(run_dir, "checkpoints").glob("round-*.ckpt"):
        match = _NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints of ``directory``."""
    checkpoints = sorted(p for p in directory.glob("round-*.ckpt") if _NAME.fullmatch(p.name))
    for old in checkpoints[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- fingerprint
def _class_name(cls: type) -> str:
    for klass in cls.__mro__:  # jsonargparse's lazy defaults subclass the real class
        if not klass.__name__.startswith("LazyInstance_") and not klass.__module__.startswith("jsonargparse"):
            return klass.__name__
    return cls.__name__


def describe(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data that is the same in every process: an object becomes its class name and
    the init arguments it keeps under their own names (the form of a resolved config, ``class_path`` +
    ``init_args``), a tensor its shape and digest, a function its qualified name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): describe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} sha256 {digest({'t': value})[:16]}"
    if inspect.isroutine(value) or inspect.isclass(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    try:
        parameters = inspect.signature(type(value).__init__).parameters
    except (TypeError, ValueError):
        parameters = {}
    if depth > 8 or not parameters:
        return _class_name(type(value))  # never a repr: it may hold a memory address
    init_args = {
        name: describe(getattr(value, name), depth + 1)
        for name, parameter in parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and hasattr(value, name)
    }  # fmt: skip
    return {"class_path": _class_name(type(value)), "init_args": init_args}


def _normalize(value: Any) -> Any:
    """Compare classes by name: a resolved config may spell ``fedilora.data.SyntheticBenchmark`` where the
    object's module is ``fedilora.data.synthetic``."""
    if isinstance(value, Mapping):
        out = {str(k): _normalize(v) for k, v in value.items()}
        if isinstance(out.get("class_path"), str):
            out["class_path"] = out["class_path"].rsplit(".", 1)[-1]
        return out
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(
    trainer_args: Mapping[str, Any], model: Any, datamodule: Any, config_yaml: str | None = None
) -> dict[str, Any]:
    """The configuration of a run as ``{"trainer.seed": 0, "model.lr": 0.001, ...}``.

    From Python objects: the trainer's init arguments, the model's hyperparameters and the
    datamodule's init arguments; with the CLI's resolved config (``config_yaml``), its ``trainer``,
    ``model`` and ``data`` sections take precedence key by key.
    """
    hparams = {k: v for k, v in dict(getattr(model, "hparams", {})).items() if not str(k).startswith("_")}
    data = describe(datamodule).get("init_args", {}) if datamodule is not None else {}
    tree = {"trainer": describe(dict(trainer_args)), "model": describe(hparams), "data": data}
    flat = _flatten(_normalize(tree))
    if config_yaml:
        resolved = yaml.safe_load(config_yaml) or {}
        sections = {k: resolved[k] for k in ("trainer", "model", "data") if isinstance(resolved.get(k), Mapping)}
        flat.update(_flatten(_normalize(sections)))
    return {k: v for k, v in flat.items() if k not in MAY_CHANGE_ON_RESUME and k.rsplit(".", 1)[-1] not in
            _MAY_CHANGE_LEAVES}  # fmt: skip


def data_digest(datamodule: Any) -> str | None:
    """SHA-256 of what a run trains and tests on: every sample's text, label and image (pixels, or the
    file name for images decoded from files), each client's split indices and missing-modality masks.
    None before ``datamodule.setup()``."""
    pool, test = getattr(datamodule, "pool", None), getattr(datamodule, "test", None)
    if pool is None or test is None:
        return None
    hasher = hashlib.sha256()
    for part in (pool, test):
        images = part.images
        images = images if isinstance(images, torch.Tensor) else list(getattr(images, "paths", [len(images)]))
        _digest({"texts": list(part.texts), "labels": part.labels, "images": images}, hasher)
    _digest(datamodule.missing_masks(), hasher)
    return hasher.hexdigest()


def make_fingerprint(
    trainer_args: Mapping[str, Any],
    model: Any,
    datamodule: Any,
    config_yaml: str | None,
    lora: Mapping[str, torch.Tensor],
    extra: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """What a checkpoint must agree on with the run resuming from it."""
    return {
        "version": FINGERPRINT_VERSION,
        "config": run_config(trainer_args, model, datamodule, config_yaml),
        "data": data_digest(datamodule),
        "shapes": {
            "lora": {k: list(v.shape) for k, v in lora.items()},
            "extra": {k: list(v.shape) for k, v in extra.items()},
        },
    }


_ABSENT = object()


def _short(value: Any) -> str:
    text = "(none)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _difference(key: str, theirs: Any, ours: Any) -> str:
    """``key: checkpoint <value>, config <value>``, narrowed to the first differing item of a list or
    mapping (``trainer.callbacks[1].init_args.blend``) where the whole values would be too long to read."""
    if max(len(_canonical(theirs)), len(_canonical(ours))) > 80:
        items: list[tuple[str, Any, Any]] = []
        if isinstance(theirs, Mapping) and isinstance(ours, Mapping):
            names = [*theirs, *(k for k in ours if k not in theirs)]
            items = [(f"{key}.{n}", theirs.get(n, _ABSENT), ours.get(n, _ABSENT)) for n in names]
        elif isinstance(theirs, list) and isinstance(ours, list):
            items = [(f"{key}[{i}]", theirs[i] if i < len(theirs) else _ABSENT, ours[i] if i < len(ours) else _ABSENT)
                     for i in range(max(len(theirs), len(ours)))]  # fmt: skip
        for name, a, b in items:
            if _canonical(a) != _canonical(b):
                return _difference(name, a, b)
    return f"{key}: checkpoint {_short(theirs)}, config {_short(ours)}"


def _canonical(value: Any) -> str:
    return "(none)" if value is _ABSENT else json.dumps(value, sort_keys=True)


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What differs between the run that wrote a checkpoint and this one (``trainer.seed: checkpoint 0,
    config 1``), or None. Options only one side knows (a new option, a CLI-only key) are not compared."""
    ours, theirs = current["config"], saved.get("config", {})
    keys = [k for k in ours if k in theirs and _canonical(ours[k]) != _canonical(theirs[k])]
    if keys:
        shown = "; ".join(_difference(k, theirs[k], ours[k]) for k in keys[:3])
        return shown + (f"; and {len(keys) - 3} more: {', '.join(keys[3:])}" if len(keys) > 3 else "")
    if current["data"] is not None and saved.get("data") is not None and saved["data"] != current["data"]:
        return (
            "data: the samples, labels, texts, image files, client splits or missing-modality masks differ "
            f"(digest checkpoint {saved['data'][:12]}, config {current['data'][:12]})"
        )
    if saved.get("shapes") != current["shapes"]:
        return "adapter shapes: the LoRA modules or head of the checkpoint differ from what this config builds"
    return None


def check_resumable(path: Path, state: Mapping[str, Any], fingerprint: Mapping[str, Any], rounds: int) -> None:
    """Refuse a resume that would not continue the same experiment, naming what differs."""
    saved = state.get("fingerprint")
    if not isinstance(saved, Mapping) or saved.get("version") != FINGERPRINT_VERSION:
        raise ConfigError(f"--ckpt_path: {path} has no fingerprint of the whole configuration; start a new run")
    completed = state["completed_rounds"]
    if rounds < completed:
        raise ConfigError(
            f"trainer.rounds: {rounds} is fewer than the {completed} rounds {path} has completed; "
            f"a resume can only add rounds (use trainer.rounds >= {completed})"
        )
    problem = fingerprint_mismatch(saved, fingerprint)
    if problem is not None:
        raise ConfigError(
            f"--ckpt_path: {path} was written by a different configuration ({problem}); only "
            "trainer.rounds (upwards), logging, evaluation and checkpoint cadence, root_dir/name and devices may "
            "change on resume"
        )
    if idle := untrained_rounds(state.get("history", [])):
        log.warning(
            "warning: --ckpt_path: %s: %d of its %d rounds trained no client (round %s: every sampled client "
            "failed or was lost, the global model did not change); they count as done and are not run again; "
            "resume from a checkpoint written before them to run them",
            path,
            len(idle),
            completed,
            ", ".join(str(r) for r in idle),
        )


def untrained_rounds(history: Any) -> list[int]:
    """The rounds of a checkpoint's history that no client trained: skipped with no accepted update
    (under DP without client figures the count is not logged, and nothing is said)."""
    return [
        int(entry.get("round", -1))
        for entry in history
        if isinstance(entry, Mapping) and entry.get("round/skipped") and entry.get("round/num_clients", -1) == 0
    ]


# ------------------------------------------------------------------------------ interruption
class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (Ctrl-C, or SIGTERM from a scheduler or ``docker stop``);
    ``fedilora`` exits with 128 + ``signum``."""

    def __init__(self, signum: int | bool = signal.SIGINT) -> None:
        if isinstance(signum, bool) or signum not in (signal.SIGINT, signal.SIGTERM):
            signum = signal.SIGINT  # a plain ``True`` flag, or a KeyboardInterrupt that no signal handler saw
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@contextlib.contextmanager
def stop_at_a_safe_point(trainer: Any) -> Iterator[None]:
    """SIGINT and SIGTERM set ``trainer._interrupted`` to the signal number, which the round loop
    checks between optimizer steps (then saves the last completed round); a second signal stops at once."""

    def handle(signum: int, frame: Any) -> None:
        if trainer._interrupted:
            raise Stopped(signum)
        trainer._interrupted = signum

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        trainer._interrupted = False
