"""Export trained adapters in peft's on-disk format.

Every adapter becomes a folder with peft's ``adapter_config.json`` and ``adapter_model.safetensors``
(written by ``PeftModel.save_pretrained``, keys as peft names them), next to ``head.safetensors``
(the fusion head and any learned missing-modality embeddings) and ``fedilora.json`` (what the
classifier needs besides the adapter, including the seed its backbone was built with).
``load_adapter`` reads one back onto an open_clip model with ``PeftModel.from_pretrained``;
``load_classifier`` rebuilds the whole classifier from the folder alone. ``fedilora.json`` also holds the
class names (``id2label``) and the side images were decoded to (``image_size``), which ``fedilora.predict``
uses.

Every file's SHA-256 is in the manifest (and the tensor files' in ``fedilora.json`` too, so that a folder
copied on its own is still checked); each loader checks them, and refuses a model with a NaN or infinite
tensor, naming the file and the tensor. An export written before the digests is loaded with a note.

Stock peft (0.21) adds the ``out_proj`` delta of LoRA on ``nn.MultiheadAttention`` twice
(huggingface/peft PR #3774), so ``PeftModel.from_pretrained`` alone would give another model. An
adapter that adapts attention layers therefore names, in its ``adapter_config.json``, a
``target_modules`` that matches nothing and says why: stock peft stops with that message rather than
load a different model. The real targets are in ``fedilora.json``, and ``load_adapter`` uses them with
fedilora's attention layer. Adapters without ``attn`` targets load with stock peft exactly.

Export never deletes what it did not write: the target folder must be empty or new, or, with
``overwrite``, only the files listed in the ``fedilora-export.json`` of an earlier export are replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedilora.backbone import FunctionalLoraMHA, adapter_name
from fedilora.checkpoint import check_finite
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier, State

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "fedilora.json")
# ``--merged``: open_clip's own folder layout (``open_clip.create_model("local-dir:<folder>")``)
MERGED_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
MANIFEST = "fedilora-export.json"
_MANIFEST_FORMAT = "fedilora-export-v2"  # files: {path: sha256}
_OLD_MANIFEST_FORMATS = ("fedilora-export-v1",)  # files: [path], no digests
# what stock peft reads as target_modules where attention layers are adapted: it matches no module, so
# PeftModel.from_pretrained stops and prints it ("Target modules <this> not found in the base model")
STOCK_PEFT_REFUSAL = (
    "[fedilora] this adapter adapts nn.MultiheadAttention, which stock peft 0.21 computes differently "
    "- huggingface/peft PR 3774 -; load it with fedilora.export.load_adapter or fedilora.export.load_classifier, "
    "or use the open_clip weights of fedilora export --merged"
)
log = logging.getLogger("fedilora")
_EXPORTED = re.compile(
    r"(global|clients/client_\d+)/(" + "|".join(re.escape(f) for f in (*ADAPTER_FILES, *MERGED_FILES)) + ")"
)


def write_adapter(
    model: LoRACLIPClassifier,
    rank: int,
    lora: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    directory: Path,
    info: Mapping[str, object],
    merged: bool = False,
) -> Path:
    """Load one client's (or the global) state into the model and save it with peft's own writer;
    ``merged``: also open_clip's weights with the adapter merged in (``MERGED_FILES``)."""
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
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    targets = config["target_modules"]
    if any(isinstance(m, FunctionalLoraMHA) for m in model.backbone.modules()):
        config["target_modules"] = STOCK_PEFT_REFUSAL
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    if merged:
        write_merged(model, rank, directory)
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
        "target_modules": targets,
        **info,
        "merged": merged,
        "sha256": {name: file_sha256(directory / name) for name in (*ADAPTER_FILES[:3], *MERGED_FILES[: 2 * merged])},
    }
    (directory / "fedilora.json").write_text(json.dumps(meta, indent=2))
    return directory


@torch.no_grad()
def merged_clip_state(model: LoRACLIPClassifier, rank: int) -> dict[str, Tensor]:
    """The open_clip state dict of ``model`` with its rank-``rank`` adapter merged: W + s * B @ A per module.

    The deltas are peft's own (``get_delta_weight``), added once, as ``FunctionalLoraMHA`` does in the
    forward pass (peft's own merge of ``nn.MultiheadAttention`` adds out_proj's twice). Frozen weights a
    run changed (FLoRA's merges) are in the base layers already.
    """
    from peft.tuners.lora import LoraLayer

    adapter = adapter_name(rank)
    plain = lambda name: name.replace(".base_layer", "")  # noqa: E731  (peft's wrappers add this level)
    state = {plain(k): v.detach().clone() for k, v in model.clip.state_dict().items() if ".lora_" not in k}
    for name, module in model.clip.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        weight = "in_proj_weight" if isinstance(base, nn.MultiheadAttention) else "weight"  # out_proj: its own Linear
        state[f"{plain(name)}.{weight}"] = getattr(base, weight) + module.get_delta_weight(adapter)
    return state


def write_merged(model: LoRACLIPClassifier, rank: int, directory: Path) -> None:
    """``open_clip_config.json`` and ``open_clip_model.safetensors``: plain open_clip loads the folder with
    ``open_clip.create_model("local-dir:<directory>")``."""
    visual = model.clip.visual
    preprocess = {"size": list(model.image_size), "mean": [float(v) for v in model.pixel_mean.flatten()],
                  "std": [float(v) for v in model.pixel_std.flatten()],
                  **{k: v for k, v in (getattr(visual, "preprocess_cfg", None) or {}).items()
                     if k not in ("size", "mean", "std")}}  # fmt: skip
    config = {"model_cfg": open_clip.get_model_config(model.model_name), "preprocess_cfg": preprocess}
    (directory / MERGED_FILES[0]).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous().cpu() for k, v in merged_clip_state(model, rank).items()}
    save_file(state, str(directory / MERGED_FILES[1]))


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
        known = content.get("format") in (_MANIFEST_FORMAT, *_OLD_MANIFEST_FORMATS)
        files = set(content["files"]) if known and isinstance(content["files"], (list, dict)) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        files = None
    # only names export writes: a hand-made manifest must not make --overwrite delete anything else
    if files is None or not all(isinstance(f, str) and _EXPORTED.fullmatch(f) for f in files):
        raise ConfigError(f"--out: {manifest} is not a manifest written by fedilora export; move it away")
    return files


def _write_manifest(root: Path, files: set[str], digests: bool = False) -> None:
    """``{"format": ..., "files": {path: sha256}}``; without ``digests`` (before the files are written) null."""
    root.mkdir(parents=True, exist_ok=True)
    listed = {f: file_sha256(root / f) if digests else None for f in sorted(files)}
    (root / MANIFEST).write_text(json.dumps({"format": _MANIFEST_FORMAT, "files": listed}, indent=2))


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def export_adapters(
    model: LoRACLIPClassifier,
    root: Path,
    global_state: tuple[int, State, State],
    personal: Mapping[int, tuple[int, State, State]],
    completed_rounds: int,
    backbone_seed: int,
    overwrite: bool = False,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
    base_weights_changed: bool = False,
    merged: bool = False,
) -> list[Path]:
    """Write ``root/global`` and ``root/clients/client_<k>`` and list their files in ``root/fedilora-export.json``.

    With ``overwrite``, files that the previous export listed are replaced (or removed, for a client
    this export does not have); a file it did not write is never touched, and one in the way is refused.
    ``classes`` (the data's class names, in label order) become ``id2label``; ``image_size`` is the side
    the data's images were decoded to; ``base_weights_changed`` marks a run that merged its adapters into
    the backbone (FLoRA), whose adapter alone is not the model. ``merged``: each folder also holds
    open_clip's weights with its adapter merged (``MERGED_FILES``), for plain open_clip.
    """
    check_export_target(root, overwrite)
    adapters = {"global": (*global_state, None)}
    adapters.update({f"clients/client_{c}": (*personal[c], c) for c in sorted(personal)})
    planned = {f"{folder}/{name}" for folder in adapters for name in (*ADAPTER_FILES, *MERGED_FILES[: 2 * merged])}
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
            info = {"client": client, "completed_rounds": completed_rounds, "backbone_seed": backbone_seed,
                    "id2label": {str(i): str(c) for i, c in enumerate(classes)} if classes is not None else None,
                    "image_size": image_size, "base_weights_changed": base_weights_changed}  # fmt: skip
            written.append(write_adapter(model, rank, lora, extra, root / folder, info, merged))
        _write_manifest(root, planned, digests=True)
    except OSError as err:
        raise ConfigError(f"--out: cannot write {root} ({err.strerror}: {err.filename})") from None
    return written


# ------------------------------------------------------------------------------------ reading
def export_folder(path: str | Path, option: str = "") -> Path:
    """The adapter folder of ``path``: itself, or ``global/`` of an export root."""
    folder = Path(path).expanduser()
    prefix = f"{option}: " if option else ""
    if (folder / "global" / "fedilora.json").is_file():
        return folder / "global"
    if not folder.is_dir():
        raise ConfigError(f"{prefix}{folder} {'is a file, not' if folder.exists() else 'does not exist; give'} "
                          "a folder written by `fedilora export`")  # fmt: skip
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(
            f"{prefix}{folder} is not an exported adapter (no adapter_config.json, no global/adapter_config.json); "
            "give a folder written by `fedilora export`"
        )
    return folder


def _manifest_digests(folder: Path) -> tuple[Path, dict[str, str | None]] | None:
    """The manifest of the export ``folder`` is part of (at the export root: its parent or grandparent)
    and the digests it lists for the folder's files; None if no manifest lists them."""
    absolute = folder.absolute()
    for root in (absolute.parent, absolute.parent.parent):
        manifest = root / MANIFEST
        if not manifest.is_file():
            continue
        try:
            files = json.loads(manifest.read_text())["files"]
            listed = {f"{absolute.relative_to(root).as_posix()}/{n}": n for n in (*ADAPTER_FILES, *MERGED_FILES)}
            if not any(key in files for key in listed):
                continue
            digests = files if isinstance(files, dict) else {}  # v1 manifests list names only
            return manifest, {name: digests.get(key) for key, name in listed.items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{type(err).__name__}: {err}"
            raise ConfigError(f"{manifest} cannot be read ({problem}); the export is damaged") from None
    return None


def verify_export(directory: str | Path, option: str = "") -> dict:
    """Check an exported adapter folder's files against their SHA-256 digests; return its ``fedilora.json``.

    A missing, unreadable or altered file is one ``ConfigError`` naming it (prefixed by ``option``, the
    command-line option that named the folder). An export written before digests existed gets a note.
    """
    folder = Path(directory).expanduser()
    prefix = f"{option}: " if option else ""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"{prefix}{folder} has no {name} (an export writes all four files)")
    try:
        meta = json.loads((folder / "fedilora.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{prefix}{folder / 'fedilora.json'} cannot be read ({type(err).__name__}: {err})") from None
    expected = [(name, digest, folder / "fedilora.json") for name, digest in dict(meta.get("sha256") or {}).items()]
    found = _manifest_digests(folder)
    if found is not None:
        manifest, listed = found
        expected += [(name, digest, manifest) for name, digest in listed.items() if digest is not None]
    if not expected:
        log.warning(f"{folder}: no content digests (exported by an earlier fedilora): its files cannot be checked")
    for name, digest, source in expected:
        if name in MERGED_FILES and not (folder / name).is_file():
            raise ConfigError(f"{prefix}{folder} has no {name}, which {source} lists")
        if name not in (*ADAPTER_FILES, *MERGED_FILES) or file_sha256(folder / name) != digest:
            raise ConfigError(
                f"{prefix}{folder / name} does not match its SHA-256 digest in {source}: it was altered or damaged "
                "after export; export the checkpoint again"
            )
    return meta


def read_tensors(path: Path, option: str = "") -> dict[str, Tensor]:
    """The tensors of a safetensors file, each checked to be finite."""
    prefix = f"{option}: " if option else ""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # truncated or not safetensors: a damaged export
        raise ConfigError(f"{prefix}{path} cannot be read ({type(err).__name__}: {err})") from None
    check_finite(tensors, f"{prefix}{path}")
    return tensors


def _peft_config(directory: Path, meta: Mapping) -> LoraConfig:
    config = LoraConfig.from_pretrained(str(directory))
    if meta.get("target_modules") is not None:  # the real targets (adapter_config.json's refuse stock peft)
        config.target_modules = meta["target_modules"]
    config._register_custom_module({nn.MultiheadAttention: FunctionalLoraMHA})
    return config


def load_adapter(clip: nn.Module, directory: str | Path) -> PeftModel:
    """A fresh open_clip model with an exported adapter, through ``PeftModel.from_pretrained``.

    The attention layers are given fedilora's ``FunctionalLoraMHA``: peft's stock layer for
    ``nn.MultiheadAttention`` (0.21) adds the out_proj delta twice (huggingface/peft PR #3774), so it
    would not reproduce the trained model. The files are checked against their digests first, and the
    adapter's tensors for NaN and infinity.
    """
    directory = Path(directory)
    meta = verify_export(directory)
    read_tensors(directory / "adapter_model.safetensors")
    return PeftModel.from_pretrained(clip, str(directory), config=_peft_config(directory, meta))


def load_head(directory: str | Path) -> dict[str, Tensor]:
    """``head.safetensors`` of an exported folder (checked against its digest, and for NaN and infinity)."""
    verify_export(directory)
    return read_tensors(Path(directory) / "head.safetensors")


def load_export(directory: str | Path, option: str = "") -> tuple[LoRACLIPClassifier, dict]:
    """The exported classifier of ``directory`` (an export root means its ``global/``), in eval mode, and
    its ``fedilora.json``.

    A backbone with ``pretrained: null`` is random: it is rebuilt from the seed the run built it with
    (``backbone_seed`` in ``fedilora.json``), inside a forked RNG, so the caller's random state is
    neither needed nor changed.
    """
    directory = export_folder(directory, option)
    prefix = f"{option}: " if option else ""
    meta = verify_export(directory, option)
    try:
        arguments, seed = meta["model_args"], meta["backbone_seed"]
    except KeyError as err:
        raise ConfigError(
            f"{prefix}{directory}: not an adapter exported by this fedilora (fedilora.json without model_args and "
            f"backbone_seed: KeyError: {err})"
        ) from None
    if meta.get("base_weights_changed"):
        raise ConfigError(
            f"{prefix}{directory}: its run merged the adapters into the backbone's weights every round (FLoRA), and "
            "this adapter alone is not the model; use the open_clip weights that `fedilora export --merged` writes "
            "(open_clip.create_model('local-dir:<folder>')) or evaluate the checkpoint"
        )
    read_tensors(directory / "adapter_model.safetensors", option)
    head = read_tensors(directory / "head.safetensors", option)
    accepted = inspect.signature(LoRACLIPClassifier.__init__).parameters
    with torch.random.fork_rng(devices=[]):  # peft's initialisation of the adapter draws random numbers too
        torch.manual_seed(seed)  # what the trainer does before it builds the backbone
        model = LoRACLIPClassifier(**{k: v for k, v in arguments.items() if k in accepted})
        model.configure_model()
        model.backbone = PeftModel.from_pretrained(model.backbone, str(directory), config=_peft_config(directory, meta))
    model.load_extra_state(head)
    return model.eval(), meta


def load_classifier(directory: str | Path) -> LoRACLIPClassifier:
    """The exported classifier of ``directory`` (see ``load_export``), in eval mode."""
    return load_export(directory)[0]
