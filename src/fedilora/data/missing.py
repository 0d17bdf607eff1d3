"""Missing-modality dropout: which samples lose their image or their text."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MissingKind = Literal["image", "text", "both"]


def missing_masks(num_samples: int, rate: float, kind: MissingKind, seed: int) -> tuple[Tensor, Tensor]:
    """``(image_present, text_present)`` boolean masks with ``round(rate * n)`` incomplete samples.

    ``kind="both"``: each incomplete sample loses the image or the text with equal probability, never
    both, so every sample keeps at least one modality.
    """
    generator = torch.Generator().manual_seed(seed)
    image_present = torch.ones(num_samples, dtype=torch.bool)
    text_present = torch.ones(num_samples, dtype=torch.bool)
    incomplete = torch.randperm(num_samples, generator=generator)[: round(rate * num_samples)]
    if kind == "image":
        image_present[incomplete] = False
    elif kind == "text":
        text_present[incomplete] = False
    else:
        loses_image = torch.rand(len(incomplete), generator=generator) < 0.5
        image_present[incomplete[loses_image]] = False
        text_present[incomplete[~loses_image]] = False
    return image_present, text_present
