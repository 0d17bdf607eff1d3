"""The client model: a frozen open_clip backbone with rank-r peft LoRA and a fusion head.

One instance serves every client of a process. The backbone is built once; each distinct LoRA rank
is one peft adapter on it. A client is swapped in by activating the adapter of its rank and copying
its adapter and head tensors in (``load_client_state``), and swapped out by copying them back out
(``client_state``). Nothing else is per client, so N clients never cost N backbones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelF1Score,
)

from fedilora.backbone import (
    TINY_MODEL,
    adapter_name,
    build_clip,
    embed_dim,
    image_normalization,
    lora_config,
    lora_target_regex,
)
from fedilora.errors import ConfigError
from fedilora.lora_ops import PEFT_PREFIX as _PEFT_PREFIX
from fedilora.types import State, Task


class LoRACLIPClassifier(L.LightningModule):
    """open_clip image and text towers with LoRA, fused by an MLP head, robust to missing modalities.

    Args:
        num_classes: Number of classes (labels for multi-label); set from the data by the CLI.
        task: ``multiclass`` (softmax, accuracy), ``multilabel`` (sigmoid per label, F1) or ``binary``
            (one logit, AUROC); set from the data by the CLI.
        model_name: open_clip model name, e.g. ``ViT-B-32``, or fedilora's tiny ``fedilora-tiny``.
        pretrained: open_clip pretrained tag, local checkpoint path, or null for random weights.
        lora_targets: Modules of every residual block that get LoRA: ``attn`` (in_proj and out_proj of
            the attention), ``c_fc``, ``c_proj`` (the MLP).
        lora_towers: Towers that get LoRA: ``visual``, ``text``.
        lora_scale: The scale s = lora_alpha / r, the same for every rank (lora_alpha_k = s * r_k).
        lora_alpha: If set, a fixed lora_alpha for every rank (scale alpha / r_k differs per rank), as
            in the paper's code; for ablations. Null keeps the constant scale.
        lora_dropout: Dropout on the LoRA input.
        missing_strategy: How a missing modality enters the model: ``zero`` (zero pixels / empty
            text, as in the paper) or ``learned`` (a learnable embedding replaces its embedding).
        head_hidden: Hidden width of the fusion MLP over the concatenated image and text embeddings.
        head_dropout: Dropout in the fusion MLP.
        lr: AdamW learning rate of the local optimizer.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        num_classes: int = 12,
        task: Task = "multiclass",
        model_name: str = TINY_MODEL,
        pretrained: str | None = None,
        lora_targets: list[str] = ["attn", "c_fc", "c_proj"],  # noqa: B006 (jsonargparse shows the default)
        lora_towers: list[str] = ["visual", "text"],  # noqa: B006
        lora_scale: float = 1.0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        missing_strategy: Literal["zero", "learned"] = "zero",
        head_hidden: int = 256,
        head_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or (task == "binary" and num_classes != 2 and num_classes != 1):
            raise ConfigError(f"model.num_classes: {num_classes} does not fit task {task!r}")
        if task not in ("multiclass", "multilabel", "binary"):
            raise ConfigError(f"model.task: unknown task {task!r}; allowed: multiclass, multilabel, binary")
        if missing_strategy not in ("zero", "learned"):
            raise ConfigError(f"model.missing_strategy: unknown {missing_strategy!r}; allowed: zero, learned")
        for option, value in (("lr", lr), ("weight_decay", weight_decay), ("lora_scale", lora_scale),
                              ("lora_alpha", lora_alpha)):  # fmt: skip
            if value is not None and not math.isfinite(value):  # NaN passes every "> 0" check
                raise ConfigError(f"model.{option}: must be a finite number, got {value}")
        if weight_decay < 0:
            raise ConfigError(f"model.weight_decay: must be >= 0, got {weight_decay}")
        if lora_scale <= 0 or (lora_alpha is not None and lora_alpha <= 0):
            raise ConfigError("model.lora_scale and model.lora_alpha must be > 0")
        if not 0.0 <= lora_dropout < 1.0 or not 0.0 <= head_dropout < 1.0:
            raise ConfigError("model.lora_dropout and model.head_dropout must be in [0, 1)")
        if head_hidden < 1:
            raise ConfigError(f"model.head_hidden: must be >= 1, got {head_hidden}")
        if lr <= 0:
            raise ConfigError(f"model.lr: must be > 0, got {lr}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.task: Task = task
        self.model_name = model_name
        self.pretrained = pretrained
        self.target_regex = lora_target_regex(lora_targets, lora_towers)
        self.lora_scale = lora_scale
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.missing_strategy = missing_strategy
        self.head_hidden = head_hidden
        self.head_dropout = head_dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.embed_dim = embed_dim(model_name)
        self.backbone: nn.Module | None = None
        self.head: nn.Module | None = None
        self.missing_embedding: nn.ParameterDict | None = None
        self.val_metrics: MetricCollection | None = None
        self.ranks: list[int] = []
        self.active_rank: int | None = None
        self._lora_params: dict[int, dict[str, nn.Parameter]] = {}

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build the frozen backbone, the head and the metrics (idempotent; seeded by the caller)."""
        if self.backbone is not None:
            return
        clip = build_clip(self.model_name, self.pretrained)
        self.backbone = clip
        mean, std = image_normalization(clip)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.image_size = (
            tuple(clip.visual.image_size)
            if isinstance(clip.visual.image_size, Sequence)
            else (
                clip.visual.image_size,
                clip.visual.image_size,
            )
        )
        tokenizer = open_clip.get_tokenizer(self.model_name)
        self.register_buffer("empty_tokens", tokenizer([""])[0], persistent=False)
        out = 1 if self.task == "binary" else self.num_classes
        self.head = nn.Sequential(
            nn.Linear(2 * self.embed_dim, self.head_hidden),
            nn.GELU(),
            nn.Dropout(self.head_dropout),
            nn.Linear(self.head_hidden, out),
        )
        if self.missing_strategy == "learned":
            self.missing_embedding = nn.ParameterDict(
                {
                    "image": nn.Parameter(torch.randn(self.embed_dim) / self.embed_dim**0.5),
                    "text": nn.Parameter(torch.randn(self.embed_dim) / self.embed_dim**0.5),
                }
            )
        self.val_metrics = self.build_metrics()

    def add_ranks(self, ranks: Iterable[int]) -> None:
        """Add one peft adapter per new rank to the shared backbone."""
        self.configure_model()
        device = self.pixel_mean.device
        largest, (module, limit) = max(ranks), self._narrowest_target()
        if largest > limit:
            raise ConfigError(
                f"trainer.ranks: rank {largest} exceeds the dimensions of LoRA target {module} ({limit}); "
                f"a rank above min(d_in, d_out) adds parameters but no capacity: use ranks <= {limit}"
            )
        for rank in sorted(set(ranks)):
            if rank in self.ranks:
                continue
            config = lora_config(rank, self.target_regex, self.lora_scale, self.lora_alpha, self.lora_dropout)
            if isinstance(self.backbone, PeftModel):
                self.backbone.add_adapter(adapter_name(rank), config)
            else:
                self.backbone = get_peft_model(self.backbone, config, adapter_name=adapter_name(rank))
            self.ranks.append(rank)
        self.backbone.to(device)
        active, self.active_rank = self.active_rank, None  # new adapters: set trainability again
        self.use_rank(active if active is not None else max(self.ranks))

    def _narrowest_target(self) -> tuple[str, int]:
        """The LoRA target with the smallest min(d_in, d_out), and that dimension."""
        pattern = re.compile(self.target_regex)
        found = []
        for name, module in self.clip.named_modules():
            name = name.removeprefix(_PEFT_PREFIX)
            if not pattern.fullmatch(name):
                continue
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if isinstance(base, nn.MultiheadAttention):
                found.append((name, base.embed_dim))
            elif isinstance(base, nn.Linear):
                found.append((name, min(base.in_features, base.out_features)))
        if not found:
            raise ConfigError(f"model.lora_targets: no module of {self.model_name} matches {self.target_regex}")
        return min(found, key=lambda item: item[1])

    def use_rank(self, rank: int) -> None:
        """Route the forward pass through the adapter of ``rank``; only it (and the head) trains."""
        if rank not in self.ranks:
            raise KeyError(f"no adapter of rank {rank}; have {self.ranks}")
        if rank == self.active_rank:
            return
        self.backbone.set_adapter(adapter_name(rank))
        for other in self.ranks:
            for param in self._lora_tensors(other).values():
                param.requires_grad_(other == rank)
        self.active_rank = rank

    @property
    def clip(self) -> nn.Module:
        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    # ------------------------------------------------------------------------ client state swaps
    def lora_state(self, rank: int | None = None) -> State:
        """A copy of the LoRA tensors of ``rank`` (default: the active one), keyed by peft's names
        without the adapter name, e.g. ``visual.transformer.resblocks.0.attn.lora_A.weight``."""
        return {k: v.detach().clone() for k, v in self._lora_tensors(rank).items()}

    def _lora_tensors(self, rank: int | None) -> dict[str, nn.Parameter]:
        """The LoRA parameters of ``rank`` under peft's state-dict names, resolved once per rank: a client
        swap is then a plain copy rather than a walk over the whole model's state dict."""
        rank = self.active_rank if rank is None else rank
        if rank not in self._lora_params:
            adapter = adapter_name(rank)
            params = {
                name.removeprefix(_PEFT_PREFIX).replace(f".{adapter}.", "."): param
                for name, param in self.backbone.named_parameters()
                if f".{adapter}." in name
            }
            peft_keys = {
                k.removeprefix(_PEFT_PREFIX) for k in get_peft_model_state_dict(self.backbone, adapter_name=adapter)
            }
            if params.keys() != peft_keys:  # our naming must stay peft's naming
                raise RuntimeError(
                    f"LoRA parameter names differ from peft's state dict: {sorted(params.keys() ^ peft_keys)[:3]}"
                )
            self._lora_params[rank] = params
        return self._lora_params[rank]

    def _apply(self, fn, *args, **kwargs):
        self._lora_params = {}  # parameters may be replaced by device or dtype moves
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def load_lora_state(self, state: Mapping[str, Tensor], rank: int | None = None) -> None:
        rank = self.active_rank if rank is None else rank
        own = self._lora_tensors(rank)
        if own.keys() != state.keys():
            missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
            raise ValueError(
                f"adapter keys do not match rank-{rank} adapter: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} does not fit rank {rank} ({tuple(own[key].shape)})"
                )
            own[key].copy_(value)

    def extra_state(self) -> State:
        """A copy of the trainable tensors that are not LoRA (head, missing-modality embeddings)."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.missing_embedding is not None:
            state.update({f"missing_embedding.{k}": v for k, v in self.missing_embedding.items()})
        return {k: v.detach().clone() for k, v in state.items()}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
            if self.missing_embedding is not None:
                for name, param in self.missing_embedding.items():
                    param.copy_(state[f"missing_embedding.{name}"])

    def client_state(self) -> tuple[State, State]:
        return self.lora_state(), self.extra_state()

    def load_client_state(self, rank: int, lora: Mapping[str, Tensor], extra: Mapping[str, Tensor]) -> None:
        self.use_rank(rank)
        self.load_lora_state(lora, rank)
        self.load_extra_state(extra)

    def base_weight(self, module: str) -> Tensor:
        """The frozen base weight of a LoRA-adapted module (``in_proj_weight`` for attention)."""
        base = self.clip.get_submodule(module).get_base_layer()
        return base.in_proj_weight if isinstance(base, nn.MultiheadAttention) else base.weight

    @torch.no_grad()
    def merge_into_base(self, deltas: Mapping[str, Tensor]) -> None:
        """Add dW (keyed by module, e.g. ``visual.transformer.resblocks.0.mlp.c_fc``) to that module's
        frozen base weight; FLoRA merges every round's aggregate this way."""
        for module, delta in deltas.items():
            weight = self.base_weight(module)
            if weight.shape != delta.shape:
                raise ValueError(f"{module}: delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
            weight.add_(delta.to(weight))

    @torch.no_grad()
    def load_base_weights(self, weights: Mapping[str, Tensor]) -> None:
        for module, value in weights.items():
            self.base_weight(module).copy_(value)

    # ------------------------------------------------------------------------------- forward
    def preprocess(self, images: Tensor) -> Tensor:
        pixels = images.to(self.pixel_mean.dtype) / 255.0 if images.dtype == torch.uint8 else images
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bilinear", align_corners=False)
        return (pixels - self.pixel_mean) / self.pixel_std

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        image_present, text_present = batch["image_present"], batch["text_present"]
        pixels = self.preprocess(batch["image"])
        tokens = batch["tokens"]
        if self.missing_strategy == "zero":
            pixels = pixels * image_present.view(-1, 1, 1, 1).to(pixels.dtype)
            tokens = torch.where(text_present.view(-1, 1), tokens, self.empty_tokens.to(tokens.dtype))
        clip = self.clip
        image = clip.encode_image(pixels, normalize=True)
        text = clip.encode_text(tokens, normalize=True)
        if self.missing_strategy == "learned":
            image = torch.where(image_present.view(-1, 1), image, self.missing_embedding["image"].to(image.dtype))
            text = torch.where(text_present.view(-1, 1), text, self.missing_embedding["text"].to(text.dtype))
        return self.head(torch.cat([image, text], dim=-1))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task == "multiclass":
            return F.cross_entropy(logits, labels)
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.float())
        return F.binary_cross_entropy_with_logits(logits, labels.float())

    def predictions(self, logits: Tensor) -> Tensor:
        """What the metrics consume: class probabilities, or per-label / positive-class probabilities."""
        if self.task == "multiclass":
            return logits.softmax(-1)
        return torch.sigmoid(logits.squeeze(-1) if self.task == "binary" else logits)

    def build_metrics(self, sync_on_compute: bool = True) -> MetricCollection:
        """torchmetrics for the task; the first one is the headline metric of reports.

        ``sync_on_compute``: torchmetrics' own flag: ``compute()`` gathers the states of every process of
        the initialised process group (the default; a no-op in one process). Off where each process
        evaluates a model of its own.

        ``multiclass``: top-1 accuracy (``acc``), top-5 accuracy (``acc_top5``, only with more than 5
        classes, where it is not trivially 1) and macro F1 (UPMC Food-101's metrics). ``multilabel``:
        micro, macro and samples F1 at threshold 0.5 (MM-IMDb's). ``binary``: AUROC and accuracy
        (Hateful Memes').
        """
        from fedilora.data.metrics import MultilabelSamplesF1Score

        sync = {"sync_on_compute": sync_on_compute}
        if self.task == "multiclass":
            metrics = {"acc": MulticlassAccuracy(self.num_classes, average="micro", **sync)}
            if self.num_classes > 5:
                metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro", **sync)
            metrics["f1_macro"] = MulticlassF1Score(self.num_classes, average="macro", **sync)
        elif self.task == "multilabel":
            metrics = {
                "f1_micro": MultilabelF1Score(self.num_classes, average="micro", **sync),
                "f1_macro": MultilabelF1Score(self.num_classes, average="macro", **sync),
                "f1_samples": MultilabelSamplesF1Score(**sync),
            }
        else:
            metrics = {"auroc": BinaryAUROC(**sync), "acc": BinaryAccuracy(**sync)}
        # MetricCollection sorts the keys of one dict alphabetically; adding one metric at a time keeps
        # this order (compute() follows it), so the headline stays first.
        # compute_groups=False: torchmetrics would otherwise merge the metrics whose states are equal after
        # the first batch it sees (e.g. top-5 accuracy and macro F1 on a tiny batch) and report one for
        # the other from then on, so figures would depend on which data a model was evaluated on first.
        names = list(metrics)
        collection = MetricCollection({names[0]: metrics[names[0]]}, compute_groups=False)
        for name in names[1:]:
            collection.add_metrics({name: metrics[name]})
        return collection.to(self.pixel_mean.device if self.backbone is not None else "cpu")

    # ------------------------------------------------------------------------- lightning steps
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch), batch["label"])
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch["label"])
        self.val_metrics.update(self.predictions(logits), batch["label"])
        if self._trainer is not None:
            self.log("val/loss", loss)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None:
            self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()})
        self.val_metrics.reset()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
