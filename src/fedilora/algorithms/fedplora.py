"""Fed-PLoRA (Zhang, Hu, Xu, ICLR 2026, arXiv 2602.16936): parallel rank-1 modules and Select-N-Fold.

The global adapter of rank R is read as R parallel rank-1 modules, dW = sum_j s B[:, j] A[j]. In a round,
client k of rank r_k trains N = r_k of them, drawn at random (seeded by run, round and client), and folds
the other R - r_k into its frozen weights: W_k = W + sum_{j not selected} s B[:, j] A[j]. Its model is then
exactly the global model (no truncation, "zero initialisation noise"), and over the rounds every module is
trained by many clients. The server averages each module over the clients that trained it (weights n_k
renormalised over them); a module nobody trained this round keeps its value. In streaming form: FediLoRA's
per-dimension sums, each update added into the dimensions it trained (``index_add``) instead of its first
r_k.

What is here: the selection (:func:`select_modules`), what a client starts from (:func:`client_payload`:
its trainable modules and the dense fold per module), and the aggregation (:class:`FedPLoRA`, which reads
the trained modules from ``update.info["modules"]``). What fedilora's engines lack to run it, so that the
method refuses to start rather than run as something else (``broadcast``):

1. the server's payload for a client must come from ``FedPLoRA.payload(global_lora, round, client, rank)``
   (the engines call ``broadcast(global_lora, rank)``, which knows neither the round nor the client);
2. ``fit_client`` must add the fold to the frozen base weights before training and restore the saved
   weights after it (``LoRACLIPClassifier.merge_into_base`` / ``load_base_weights`` do both), and put the
   selection into ``update.info["modules"]``; under Flower the fold (or the full global adapter) travels
   in the message;
3. a client's personalized model is its trained modules on top of its fold: stored as the rank-R adapter
   with the trained modules put back in their places, not as the rank-r_k update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.errors import ConfigError
from fedilora.lora_ops import module_keys, rank_axis
from fedilora.types import ClientUpdate, State

#: the key of ``ClientUpdate.info`` that names the global modules an update's rank dimensions trained
MODULES = "modules"


def select_modules(seed: int, round: int, client: int, rank: int, global_rank: int) -> list[int]:
    """The ``rank`` of the ``global_rank`` rank-1 modules that ``client`` trains in ``round``, ascending:
    a draw without replacement seeded by the run, the round and the client (any process draws the same)."""
    from fedilora.server import client_seed

    if not 0 < rank <= global_rank:
        raise ValueError(f"client {client}: rank {rank} outside 1..{global_rank} (the global rank)")
    generator = torch.Generator().manual_seed(client_seed(seed, round, client))
    return sorted(torch.randperm(global_rank, generator=generator)[:rank].tolist())


def client_payload(global_lora: Mapping[str, Tensor], modules: Sequence[int], scale: float) -> tuple[State, State]:
    """(trainable adapter of rank len(modules), ``{prefix: fold}``) for a client that trains ``modules``.

    The trainable adapter holds the selected modules in ascending order; the fold is
    sum_{j not in modules} s B[:, j] A[j] per module, what the client adds to its frozen weight, so that
    fold + s B_sel A_sel = s B A: the client starts from the global model exactly.
    """
    index = torch.as_tensor(list(modules), dtype=torch.long)
    trainable = {k: v.index_select(rank_axis(k), index.to(v.device)).clone() for k, v in global_lora.items()}
    fold = {}
    for prefix, (a, b) in module_keys(global_lora).items():
        rest = torch.ones(global_lora[a].shape[0], dtype=torch.bool, device=global_lora[a].device)
        rest[index.to(rest.device)] = False
        fold[prefix] = scale * global_lora[b][:, rest] @ global_lora[a][rest]
    return trainable, fold


def trained_modules(update: ClientUpdate, global_rank: int) -> Tensor:
    """``update.info["modules"]`` checked: ``update.rank`` distinct module indices in 0..R-1."""
    modules = update.info.get(MODULES)
    source = f"client {update.client_id}"
    if modules is None:
        raise ValueError(f"{source}: the update does not say which rank-1 modules it trained (info[{MODULES!r}])")
    index = torch.as_tensor(list(modules), dtype=torch.long)
    if index.numel() != update.rank or len(set(index.tolist())) != update.rank:
        raise ValueError(f"{source}: {len(index)} module indices for rank {update.rank}, expected distinct ones")
    if index.numel() and not (int(index.min()) >= 0 and int(index.max()) < global_rank):
        raise ValueError(f"{source}: module indices {index.tolist()} outside 0..{global_rank - 1}")
    return index


class SelectedAccumulator(DimensionAccumulator):
    """Per-module sums and weights: each update added, with weight n_k, into the modules it trained."""

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        index = trained_modules(update, self.global_rank)
        weight = float(update.num_samples)
        for key, total in self.lora.sums.items():
            tensor = update.lora[key].to(total)
            total.index_add_(rank_axis(key), index.to(total.device), tensor, alpha=weight)
        self.lora.weight.index_add_(0, index, torch.full((len(index),), weight, dtype=torch.float64))
        self.total += weight


class FedPLoRA(Aggregator):
    """Select-N-Fold: each module averaged over the clients that trained it; see the module docstring for
    what the engines must do before this method can run."""

    accumulator = SelectedAccumulator
    needs_constant_scale = True
    dp_refusal = "each client trains a different, randomly drawn set of modules over its own folded weights"
    secagg_refusal = "the modules each client trained are not part of the masked per-dimension sums"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def payload(
        self, global_lora: Mapping[str, Tensor], round: int, client: int, rank: int
    ) -> tuple[State, State, list[int]]:
        """What ``client`` of ``rank`` starts ``round`` from: (trainable modules, fold per module, their indices)."""
        global_rank = max(v.shape[rank_axis(k)] for k, v in global_lora.items())
        modules = select_modules(self.seed, round, client, rank, global_rank)
        trainable, fold = client_payload(global_lora, modules, self.scale)
        return trainable, fold, modules

    def broadcast(self, global_lora: Mapping[str, Tensor], rank: int) -> State:
        raise ConfigError(
            "trainer.aggregator: FedPLoRA needs each client to fold its untrained modules into its frozen "
            "weights, which fedilora's engines do not do yet (see fedilora.algorithms.fedplora); use another method"
        )

    def finish(self, acc: Accumulator) -> State:
        return average_sums(acc)
