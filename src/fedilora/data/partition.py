"""Splitting one dataset over clients: IID or Dirichlet label skew, then per-client splits."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedilora.errors import ConfigError


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[Tensor]:
    """Shuffle and cut into ``num_clients`` parts whose sizes differ by at most one."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.tensor_split(order, num_clients)]


def dirichlet_partition(labels: Tensor, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[Tensor]:
    """Label skew: each class is split over clients with proportions drawn from Dir(alpha).

    Small ``alpha`` gives each client few classes. Draws again (up to 100 times) until every client
    has ``min_size`` samples. Multi-label targets are partitioned by their first positive label.
    """
    if alpha <= 0:
        raise ConfigError(f"data.dirichlet_alpha: must be > 0, got {alpha}")
    classes = labels if labels.dim() == 1 else labels.float().argmax(dim=1)
    classes = classes.numpy()
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise ConfigError(
        f"data.dirichlet_alpha: with alpha={alpha} and {num_clients} clients some client keeps getting fewer "
        f"than {min_size} samples; raise alpha, lower data.num_clients or use more data"
    )


def split_client(indices: Tensor, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A client's own train / val / test split of its samples."""
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))]
    n_val = round(val_fraction * len(order))
    n_test = round(test_fraction * len(order))
    return {
        "val": order[:n_val].sort().values,
        "test": order[n_val : n_val + n_test].sort().values,
        "train": order[n_val + n_test :].sort().values,
    }
