"""What a dataset hands to the federated datamodule."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import Tensor

from fedilora.types import Task


class ImageStore(Protocol):
    """Images indexed by a LongTensor of sample indices, returned as uint8 ``[B, 3, H, W]``.

    A uint8 tensor is one (the embedded benchmark); ``fedilora.data.ImageFiles`` is another, which
    decodes image files on access so that a large dataset never sits in memory.
    """

    def __getitem__(self, index: Tensor) -> Tensor: ...

    def __len__(self) -> int: ...


@dataclass
class MultimodalData:
    """One pool of image-text samples: ``labels`` is ``[N]`` class ids or ``[N, C]`` multi-hot."""

    images: ImageStore
    texts: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.texts)


class MultimodalSource:
    """A dataset: the pool that is partitioned over clients and the global test pool kept apart."""

    num_classes: int
    task: Task

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        """Return ``(client_pool, global_test)``."""
        raise NotImplementedError


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDILORA_CACHE_DIR", Path.home() / ".cache" / "fedilora"))
