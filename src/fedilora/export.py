"""Export trained adapters in peft's on-disk format.

Every adapter becomes a folder with peft's ``adapter_config.json`` and ``adapter_model.safetensors``
(written by ``PeftModel.save_pretrained``, keys as peft names them), next to ``head.safetensors``
(the fusion head and any learned missing-modality embeddings) and ``fedilora.json`` (what the
classifier needs besides the adapter, including the seed its backbone was built with).
``load_adapter`` reads one back onto an open_clip model with ``PeftModel.from_pretrained``;
``load_classifier`` rebuilds the whole classifier from the folder alone.

Export never deletes what it did not write: the target folder must be empty or new, or, with
``overwrite``, only the files listed in the ``fedilora-export.json`` of an earlier export are replaced.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedilora.backbone import FunctionalLoraMHA, adapter_name
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier, State

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "fedilora.json")
MANIFEST = "fedilora-export.json"
_MANIFEST_FORMAT = "fedilora-export-v1"
_EXPORTED = re.compile(r"(global|clients/client_\d+)/(" + "|".join(re.escape(f) for f in ADAPTER_FILES) + ")")


def write_adapter(
    model: LoRACLIPClassifier,
    rank: int,
    lora: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    directory: Path,
    info: Mapping[str, object],
) -> Path:
    """Load one client's (or the global) state into the model and save it with peft's own writer."""
    model.load_client_state(rank, lora, extra)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.backbone.save_pretrained(str(staging), selected_adapters=[adapter_name(rank)])
        for name in ADAPTER_FILES[:2]:  # peft writes a non-default adapter into a sub-folder named after it
            os.replace(staging / adapter_name(rank) / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(directory / "head.safetensors"))
    meta = {
        "model_name": model.model_name,
        "pretrained": model.pretrained,
        "num_classes": model.num_classes,
        "task": model.task,
        "rank": rank,
        "lora_scale": model.lora_scale,
        "missing_strategy": model.missing_strategy,
        "head_hidden": model.head_hidden,
        # everything LoRACLIPClassifier was built with: load_classifier rebuilds it from this alone
        "model_args": {k: v for k, v in dict(model.hparams).items() if not str(k).startswith("_")},
        **info,
    }
    (directory / "fedilora.json").write_text(json.dumps(meta, indent=2))
    return directory


def check_export_target(root: Path, overwrite: bool) -> None:
    """Refuse a target that export could not write without touching files it did not write."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out: {root} is a file, not a folder")
    if not overwrite and root.is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"--out: {root} is not empty; export writes into an empty or new folder "
            "(--overwrite replaces the files of an earlier export there and keeps every other file)"
        )


def _previous_export(root: Path) -> set[str]:
    """The files an earlier export wrote to ``root``, from its manifest (empty if there is none)."""
    manifest = root / MANIFEST
    if not manifest.exists():
        return set()
    try:
        content = json.loads(manifest.read_text())
        files = set(content["files"]) if content.get("format") == _MANIFEST_FORMAT else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        files = None
    # only names export writes: a hand-made manifest must not make --overwrite delete anything else
    if files is None or not all(isinstance(f, str) and _EXPORTED.fullmatch(f) for f in files):
        raise ConfigError(f"--out: {manifest} is not a manifest written by fedilora export; move it away")
    return files


def _write_manifest(root: Path, files: set[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps({"format": _MANIFEST_FORMAT, "files": sorted(files)}, indent=2))


def export_adapters(
    model: LoRACLIPClassifier,
    root: Path,
    global_state: tuple[int, State, State],
    personal: Mapping[int, tuple[int, State, State]],
    completed_rounds: int,
    backbone_seed: int,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``root/global`` and ``root/clients/client_<k>`` and list their files in ``root/fedilora-export.json``.

    With ``overwrite``, files that the previous export listed are replaced (or removed, for a client
    this export does not have); a file it did not write is never touched, and one in the way is refused.
    """
    check_export_target(root, overwrite)
    adapters = {"global": (*global_state, None)}
    adapters.update({f"clients/client_{c}": (*personal[c], c) for c in sorted(personal)})
    planned = {f"{folder}/{name}" for folder in adapters for name in ADAPTER_FILES}
    try:
        previous = _previous_export(root)
        for relative in sorted(planned - previous):
            if os.path.lexists(root / relative):
                raise ConfigError(
                    f"--out: {root / relative} exists and was not written by fedilora export; move it away "
                    "or choose another --out"
                )
        _write_manifest(root, previous | planned)  # an export that dies half-way still lists all it wrote
        for relative in sorted(previous - planned):
            (root / relative).unlink(missing_ok=True)
            for parent in (root / relative).parents:  # folders export made, once nothing else is in them
                if parent == root or any(parent.iterdir()):
                    break
                parent.rmdir()
        written = []
        for folder, (rank, lora, extra, client) in adapters.items():
            info = {"client": client, "completed_rounds": completed_rounds, "backbone_seed": backbone_seed}
            written.append(write_adapter(model, rank, lora, extra, root / folder, info))
        _write_manifest(root, planned)
    except OSError as err:
        raise ConfigError(f"--out: cannot write {root} ({err.strerror}: {err.filename})") from None
    return written


def load_adapter(clip: nn.Module, directory: str | Path) -> PeftModel:
    """A fresh open_clip model with an exported adapter, through ``PeftModel.from_pretrained``.

    The attention layers are given fedilora's ``FunctionalLoraMHA``: peft's stock layer for
    ``nn.MultiheadAttention`` (0.21) adds the out_proj delta twice (huggingface/peft PR #3774), so it
    would not reproduce the trained model. Adapters without ``attn`` targets load with stock peft alike.
    """
    config = LoraConfig.from_pretrained(str(directory))
    config._register_custom_module({nn.MultiheadAttention: FunctionalLoraMHA})
    return PeftModel.from_pretrained(clip, str(directory), config=config)


def load_head(directory: str | Path) -> dict[str, Tensor]:
    return load_file(str(Path(directory) / "head.safetensors"))


def load_classifier(directory: str | Path) -> LoRACLIPClassifier:
    """The exported classifier of ``directory`` (backbone, adapter and head), in eval mode.

    A backbone with ``pretrained: null`` is random: it is rebuilt from the seed the run built it with
    (``backbone_seed`` in ``fedilora.json``), inside a forked RNG, so the caller's random state is
    neither needed nor changed.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "fedilora.json").read_text())
        arguments = meta["model_args"]
        seed = meta["backbone_seed"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"{directory}: not an adapter exported by this fedilora (fedilora.json without model_args and "
            f"backbone_seed: {type(err).__name__}: {err})"
        ) from None
    accepted = inspect.signature(LoRACLIPClassifier.__init__).parameters
    with torch.random.fork_rng(devices=[]):  # peft's initialisation of the adapter draws random numbers too
        torch.manual_seed(seed)  # what the trainer does before it builds the backbone
        model = LoRACLIPClassifier(**{k: v for k, v in arguments.items() if k in accepted})
        model.configure_model()
        model.backbone = load_adapter(model.backbone, directory)
    model.load_extra_state(load_head(directory))
    return model.eval()
