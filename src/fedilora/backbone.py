"""open_clip backbones and the peft LoRA configuration applied to them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMHA
from torch import Tensor, nn

from fedilora.errors import ConfigError

TINY_MODEL = "fedilora-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"

# Module names inside open_clip's ResidualAttentionBlock. `attn` is an nn.MultiheadAttention: peft
# adapts its packed in_proj and its out_proj together. `attn.out_proj` alone is refused because MHA
# reads out_proj.weight directly in its functional forward, so a LoRA there would silently do nothing.
LORA_TARGETS = {"attn": "attn", "c_fc": r"mlp\.c_fc", "c_proj": r"mlp\.c_proj"}
TOWERS = {"visual": r"visual\.transformer", "text": r"transformer"}


def register_model_configs() -> None:
    """Make fedilora's own open_clip configs (``fedilora-tiny``) known to ``open_clip.create_model``."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def embed_dim(model_name: str) -> int:
    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise ConfigError(
            f"model.model_name: unknown open_clip model {model_name!r}; choose one of open_clip.list_models() "
            f"(e.g. {known}, ...) or {TINY_MODEL!r}"
        )
    return int(config["embed_dim"])


def build_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """Build an open_clip model with every parameter frozen.

    ``pretrained`` is an open_clip tag, a local checkpoint file, or None for random weights.
    """
    embed_dim(model_name)  # validates the name
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ConfigError(
                f"model.pretrained: {pretrained!r} is neither a file nor an open_clip tag of {model_name!r} "
                f"(tags: {', '.join(tags) or 'none'}); give a local checkpoint path or null"
            )
    # open_clip warns on the root logger for every randomly initialised model: the expected case here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
    except Exception as err:  # network, hub or checkpoint-format failures all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ConfigError(
            f"model.pretrained: could not load {pretrained!r} for {model_name!r} "
            f"({type(err).__name__}: {err}). Pretrained tags are downloaded from the internet"
            f"{' and HF_HUB_OFFLINE=1 is set' if offline else ''}; offline, give a local checkpoint path "
            f"or pretrained: null"
        ) from None
    finally:
        root.setLevel(level)
    model.requires_grad_(False)
    return model


def lora_target_regex(targets: Sequence[str], towers: Sequence[str]) -> str:
    """The peft ``target_modules`` regex selecting ``targets`` in the residual blocks of ``towers``."""
    if not targets:
        raise ConfigError(f"model.lora_targets: give at least one of {sorted(LORA_TARGETS)}")
    if not towers:
        raise ConfigError(f"model.lora_towers: give at least one of {sorted(TOWERS)}")
    for target in targets:
        if target not in LORA_TARGETS:
            hint = (
                " (attn.out_proj cannot be adapted alone: MultiheadAttention reads its weight directly; "
                "target 'attn', which adapts in_proj and out_proj together)"
                if "out_proj" in target
                else ""
            )
            raise ConfigError(f"model.lora_targets: unknown target {target!r}; allowed: {sorted(LORA_TARGETS)}{hint}")
    for tower in towers:
        if tower not in TOWERS:
            raise ConfigError(f"model.lora_towers: unknown tower {tower!r}; allowed: {sorted(TOWERS)}")
    tower_re = "|".join(TOWERS[t] for t in dict.fromkeys(towers))
    target_re = "|".join(LORA_TARGETS[t] for t in dict.fromkeys(targets))
    return rf"^({tower_re})\.resblocks\.\d+\.({target_re})$"


class FunctionalLoraMHA(PeftLoraMHA):
    """peft's LoRA for ``nn.MultiheadAttention``, applied out of place.

    peft's own layer (0.21) merges s * B @ A into ``in_proj_weight`` and ``out_proj.weight`` before
    every forward and subtracts it afterwards. Two problems follow: the float round trip does not
    restore the frozen weights exactly, so the backbone drifts with every forward (and a client's
    result depends on which clients the process ran before), and the out_proj delta is added twice
    (huggingface/peft PR #3774). Here W + s * B @ A is formed out of place and passed to the
    functional attention; parameters, their names and the state-dict layout stay peft's own.
    """

    def forward(self, query: Tensor, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(query, *args, **kwargs)
        return self._adapted_attention(active, query, *args, **kwargs)

    def _adapted_attention(
        self,
        active: list[str],
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        mha = self.get_base_layer()
        out_proj = mha.out_proj  # a peft lora.Linear wrapping the original out_proj
        in_weight = mha.in_proj_weight + sum(self.get_delta_weight(a) for a in active)
        out_weight = out_proj.get_base_layer().weight + sum(out_proj.get_delta_weight(a) for a in active)
        if mha.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            in_weight,
            mha.in_proj_bias,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            out_weight,
            out_proj.get_base_layer().bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (output.transpose(0, 1) if mha.batch_first else output), weights


def lora_config(rank: int, target_regex: str, scale: float, alpha: float | None, dropout: float) -> LoraConfig:
    """peft config for one rank.

    With ``alpha=None`` the scale ``s = lora_alpha / rank`` is the same for every rank, which is what
    makes truncating a global adapter to a smaller rank meaningful. A fixed ``alpha`` reproduces the
    paper code (scale alpha/r differs per rank) for ablations.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_regex,
        bias="none",
    )
    config._register_custom_module({nn.MultiheadAttention: FunctionalLoraMHA})
    return config


def adapter_name(rank: int) -> str:
    return f"rank_{rank}"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def image_normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return mean, std
