"""Export trained adapters in peft's on-disk format.

Every adapter becomes a folder with peft's ``adapter_config.json`` and ``adapter_model.safetensors``
(written by ``PeftModel.save_pretrained``, keys as peft names them), next to ``head.safetensors``
(the fusion head and any learned missing-modality embeddings) and ``fedilora.json`` (what the
classifier needs besides the adapter). ``load_adapter`` reads one back onto a fresh open_clip model
with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedilora.backbone import FunctionalLoraMHA, adapter_name
from fedilora.model import LoRACLIPClassifier


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
    staging = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.backbone.save_pretrained(str(staging), selected_adapters=[adapter_name(rank)])
    shutil.rmtree(directory, ignore_errors=True)
    # peft writes a non-default adapter into a sub-folder named after it
    shutil.move(str(staging / adapter_name(rank)), str(directory))
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
        **info,
    }
    (directory / "fedilora.json").write_text(json.dumps(meta, indent=2))
    return directory


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
