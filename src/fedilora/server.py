"""The server side of a federated round, independent of transport and of the engine that drives it.

``FederatedServer`` holds the global adapter and head, every client's personalized state and the
aggregator. Per round it gives the plan (which clients, at which rank), each client's payload (the
global adapter truncated to its rank), and turns the uploaded updates into the next global state:
fault filter, aggregation with any ``Aggregator``, head averaging by sample count. The Fabric engine
(``fedilora.trainer``) and the Flower apps drive the same object; neither writes round logic of its own.

Fault filter, in order (a rejected update is left out of the aggregation and of the personalized models;
the rules live in ``fedilora.update_checks``):

1. ``check_update``, per update: NaN/Inf anywhere (LoRA or head), or an L2 distance from what the
   client received above ``max_update_norm`` (off by default).
2. ``outliers``, over the round: with at least ``MIN_UPDATES_FOR_MEDIAN`` updates left, an update whose
   norm exceeds ``update_norm_factor`` times the round's median norm (default 10; ``null`` turns it
   off). It holds while fewer than half of a round's updates are poisoned.
3. A round with fewer than ``min_clients_per_round`` updates left is skipped: the global state stays.

Under differential privacy only the first runs (a client's own check on its own update): a rejected
client adds a zero delta, the divisors K and n_i come from the round's plan, no round is skipped and
the outlier rule is off, because each of those decisions would depend on other clients' data outside
the accounted mechanism (``fedilora.privacy.dp``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedilora.algorithms.base import Aggregator, method_name
from fedilora.algorithms.sums import sample_weights, weighted_average
from fedilora.errors import ConfigError, RunFailed
from fedilora.lora_ops import nbytes
from fedilora.personal import Personal, PersonalStore
from fedilora.privacy.dp import DifferentialPrivacy, coverage
from fedilora.privacy.rounds import add_contributions, contribution, release, zero_contribution
from fedilora.privacy.secagg import SecureAggregation
from fedilora.types import ClientUpdate, State
from fedilora.update_checks import MIN_UPDATES_FOR_MEDIAN as MIN_UPDATES_FOR_MEDIAN  # re-exported
from fedilora.update_checks import check_update, outliers
from fedilora.update_checks import update_norm as update_norm

NOISE_STREAM = -2  # the "client id" of the server's privacy noise in ``client_seed``
POOLED = -1  # the client id of ``Centralized``'s single model trained on the union of all clients


strategy_name = method_name  # the name this module exported before ``fedilora.algorithms``


# ----------------------------------------------------------------------------------------- round plan
def client_seed(seed: int, round: int, client: int) -> int:
    """The seed of one client's local training in one round: independent of which process trains it."""
    return ((seed * 1_000_003 + round) * 1_000_033 + client) % (2**62)


def sample_clients(num_clients: int, per_round: int, seed: int, round: int) -> list[int]:
    """The clients of ``round``: a seeded draw without replacement (a function of the round only)."""
    generator = torch.Generator().manual_seed(seed * 7919 + round)
    return sorted(torch.randperm(num_clients, generator=generator)[:per_round].tolist())


def round_plan(
    aggregator: Aggregator, ranks: Sequence[int], per_round: int, global_rank: int, seed: int, round: int
) -> list[tuple[int, int]]:
    """``(client, rank)`` pairs trained in ``round`` (``POOLED`` stands for the union of all clients)."""
    if aggregator.pooled:
        return [(POOLED, global_rank)]
    return [(c, ranks[c]) for c in sample_clients(len(ranks), per_round, seed, round)]


# -------------------------------------------------------------------------------------- configuration
def client_ranks(ranks: int | Sequence[int], num_clients: int) -> list[int]:
    """One LoRA rank per client from ``trainer.ranks`` (a single rank for all, or a list)."""
    if isinstance(ranks, int):
        return [ranks] * num_clients
    if len(ranks) != num_clients:
        raise ConfigError(
            f"trainer.ranks: {len(ranks)} ranks given but data.num_clients is {num_clients}; "
            "give one rank per client or a single rank for all"
        )
    return list(ranks)


def clients_per_round(value: int | float, num_clients: int) -> int:
    """How many clients a round samples, from ``trainer.clients_per_round`` (a count or a fraction)."""
    if isinstance(value, float):
        return max(1, round(value * num_clients))
    if value > num_clients:
        raise ConfigError(f"trainer.clients_per_round: {value} is more than data.num_clients ({num_clients})")
    return value


def check_federation(
    aggregator: Aggregator,
    ranks: Sequence[int],
    per_round: int,
    min_clients_per_round: int,
    lora_alpha: float | None,
    model_labels: tuple[int, str],
    data_labels: tuple[int, str],
) -> None:
    """Refuse combinations of options that cannot run (one ``ConfigError`` naming the option)."""
    if aggregator.requires_equal_ranks and len(set(ranks)) > 1:
        raise ConfigError(
            f"trainer.aggregator: {strategy_name(aggregator)} needs every client to have the same rank, "
            f"got trainer.ranks={list(ranks)}"
        )
    if aggregator.needs_constant_scale and lora_alpha is not None:
        raise ConfigError(
            f"trainer.aggregator: {strategy_name(aggregator)} multiplies B @ A with one LoRA scale for all "
            "ranks; set model.lora_alpha: null (constant scale)"
        )
    if model_labels != data_labels:
        raise ConfigError(
            f"model.num_classes/task ({model_labels[0]}, {model_labels[1]}) do not match the data "
            f"({data_labels[0]}, {data_labels[1]})"
        )
    if min_clients_per_round > (1 if aggregator.pooled else per_round):
        raise ConfigError(
            f"trainer.min_clients_per_round: {min_clients_per_round} is more than the {per_round} clients "
            "sampled per round: every round would be skipped"
        )


# --------------------------------------------------------------------------------------- the round step
@dataclass
class RoundResult:
    """What the server did with one round's uploads."""

    round: int
    updates: list[ClientUpdate]  # accepted, in plan order
    rejected: list[tuple[int, str]]  # (client, why), in plan order
    skipped: bool  # too few accepted updates: the global state is unchanged
    #: dW per module that this round merged into the base weights (FLoRA); every model copy must add it
    base_delta: State = field(default_factory=dict)
    norm_ratio: float = math.nan  # largest update norm / the round's median (NaN: too few updates)
    privacy: dict[str, float] = field(default_factory=dict)  # epsilon, clip norm, secure aggregation cost
    #: bytes the clients uploaded, where the updates are not what they uploaded (None: the updates' size)
    uploaded: float | None = None
    #: under DP without ``log_client_metrics``: report only released or public figures
    released_only: bool = False
    skip_reason: str = ""  # why the round was skipped, where it is not the healthy-update count

    def warnings(self, min_clients_per_round: int) -> list[str]:
        if self.skip_reason:
            return [self.skip_reason]
        if self.released_only:  # which clients failed, and why, is about their data: not covered by epsilon
            return []
        lines = [
            f"warning: round {self.round}: client {client} left out of the aggregation ({why})"
            for client, why in self.rejected
        ]
        if self.skipped:
            lines.append(
                f"warning: round {self.round} skipped: {len(self.updates)} healthy update(s), fewer than "
                f"trainer.min_clients_per_round={min_clients_per_round}; the global model is unchanged"
            )
        return lines

    def metrics(self, communicates: bool, downloaded: int, seconds: float) -> dict[str, float]:
        """The round's logged figures (``downloaded``: bytes the clients received to start the round)."""
        updates = self.updates
        metrics = {f"client/{u.client_id}/train_loss": u.train_loss for u in updates}
        metrics.update(
            {
                "train/loss": sum(u.train_loss for u in updates) / len(updates) if updates else math.nan,
                "comm/bytes_uploaded": (
                    (float(sum(u.nbytes() for u in updates)) if self.uploaded is None else self.uploaded)
                    if communicates
                    else 0.0
                ),
                "comm/bytes_downloaded": float(downloaded) if communicates else 0.0,
                "round/num_clients": float(len(updates)),
                "round/rejected_updates": float(len(self.rejected)),
                "round/skipped": float(self.skipped),
                "round/time_s": seconds,
            }
        )
        if not math.isnan(self.norm_ratio):  # defined with enough updates only
            metrics["round/update_norm_ratio"] = self.norm_ratio
        return {**metrics, **self.privacy}  # under DP the engine keeps only the released ones (with the rest)


class FederatedServer:
    """Global state, personalized states and the round step of one federation.

    Args:
        aggregator: The strategy (``setup(scale=...)`` already called).
        ranks: LoRA rank of every client.
        per_round: Clients sampled per round.
        global_rank: Rank of the global adapter.
        seed: The run's seed (client sampling).
        global_lora: The initial global adapter (rank ``global_rank``).
        global_extra: The initial head (and other non-LoRA trainable tensors).
        min_clients_per_round: A round with fewer accepted updates is skipped.
        max_update_norm: Reject an update farther than this from what its client received (None: off).
        update_norm_factor: Reject an update whose norm exceeds this many times the round's median
            norm, with at least ``MIN_UPDATES_FOR_MEDIAN`` updates (None: off).
        privacy: Client-level differential privacy of the aggregate (``setup`` already called).
        secure_aggregation: Sum the clients' contributions from pairwise-masked vectors only.
        personal: Where the personalized states are kept (default: all in RAM).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        ranks: Sequence[int],
        per_round: int,
        global_rank: int,
        seed: int,
        global_lora: State,
        global_extra: State,
        min_clients_per_round: int = 1,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = 10.0,
        privacy: DifferentialPrivacy | None = None,
        secure_aggregation: SecureAggregation | None = None,
        personal: PersonalStore | None = None,
    ) -> None:
        self.aggregator, self.ranks, self.per_round = aggregator, list(ranks), per_round
        self.global_rank, self.seed = global_rank, seed
        self.min_clients_per_round = min_clients_per_round
        self.max_update_norm, self.update_norm_factor = max_update_norm, update_norm_factor
        self.global_lora, self.global_extra = global_lora, global_extra
        self.personal = personal if personal is not None else PersonalStore()
        self.privacy, self.secure_aggregation = privacy, secure_aggregation

    @property
    def merges_into_base(self) -> bool:
        return self.aggregator.merges_into_base

    def plan(self, round: int) -> list[tuple[int, int]]:
        return round_plan(self.aggregator, self.ranks, self.per_round, self.global_rank, self.seed, round)

    def payload(self, client: int, rank: int) -> tuple[State, State]:
        """What ``client`` starts its round from: the global adapter truncated to ``rank`` and the head;
        under ``Local`` (no communication) its own previous model, once it has one."""
        if not self.aggregator.communicates and client in self.personal:
            _, lora, extra = self.personal[client]
            return lora, extra
        return self.aggregator.broadcast(self.global_lora, rank), self.global_extra

    def download_nbytes(self, lora: Mapping[str, Tensor], extra: Mapping[str, Tensor]) -> int:
        """Bytes a client downloads to start a round from this payload."""
        return self.aggregator.download_nbytes(lora) + nbytes(extra)

    def check(self, update: ClientUpdate, lora: Mapping[str, Tensor], extra: Mapping[str, Tensor]) -> str | None:
        """``check_update`` with this server's ``max_update_norm`` (``lora``/``extra``: the payload sent)."""
        return check_update(update, lora, extra, self.max_update_norm)

    def aggregate(
        self, round: int, updates: Sequence[ClientUpdate], rejected: Sequence[tuple[int, str]] = ()
    ) -> RoundResult:
        """Apply one round's uploads: outlier rule, personalized states, skip rule, aggregation, head.

        ``updates`` passed ``check`` (they carry ``metrics["update_norm"]``); ``rejected`` are the
        clients already left out (an exception, or ``check`` failed), kept for the report.
        """
        updates, rejected = list(updates), list(rejected)
        missing = [u.client_id for u in updates if "update_norm" not in u.metrics]
        if missing:
            raise ValueError(f"updates of clients {missing} were not checked (FederatedServer.check) before aggregate")
        dp = self.privacy is not None
        far, ratio = ([], math.nan) if dp else outliers([u.metrics["update_norm"] for u in updates],
                                                        self.update_norm_factor)  # fmt: skip
        if far:
            median = statistics.median(u.metrics["update_norm"] for u in updates)
            for i in far:
                norm = updates[i].metrics["update_norm"]
                rejected.append(
                    (
                        updates[i].client_id,
                        f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g}, above "
                        f"trainer.update_norm_factor={self.update_norm_factor}",
                    )
                )
            updates = [u for i, u in enumerate(updates) if i not in set(far)]
        for update in updates:
            if update.client_id != POOLED:  # personalized states wait on the CPU, not in device memory
                self.personal[update.client_id] = (update.rank, _cpu(update.lora), _cpu(update.extra))
        skipped = not dp and self.skips(len(updates))
        delta: State = {}
        privacy: dict[str, float] = {}
        aggregator = self.aggregator
        skip_reason = ""
        if not skipped and (self.privacy is not None or self.secure_aggregation is not None):
            released = self._private_aggregate(round, updates)
            if released is None:
                skipped, skip_reason = True, self._too_few_to_unmask(round)
            else:
                self.global_lora, self.global_extra, privacy = released
        elif not skipped and (aggregator.communicates or aggregator.pooled):
            self.global_lora = aggregator.aggregate(self.global_lora, updates)
            self.global_extra = weighted_average([u.extra for u in updates], sample_weights(updates))
            if self.merges_into_base:
                delta = aggregator.last_delta
        order = {client: i for i, (client, _) in enumerate(self.plan(round))}
        rejected.sort(key=lambda r: order.get(r[0], len(order)))
        return RoundResult(round, updates, rejected, skipped, delta, ratio, privacy, released_only=self.released_only,
                           skip_reason=skip_reason)  # fmt: skip

    @property
    def released_only(self) -> bool:
        """Under DP (unless ``log_client_metrics``), rounds report only released or public figures."""
        return self.privacy is not None and not self.privacy.log_client_metrics

    def skips(self, accepted: int) -> bool:
        """Whether a round with ``accepted`` updates is skipped (fewer than ``min_clients_per_round``)."""
        return accepted < self.min_clients_per_round

    def masking_context(self, round: int) -> bytes:
        """What binds the masks of secure aggregation to this run and round (each pass appends its number)."""
        return f"seed-{self.seed}/round-{round}".encode()

    def _too_few_to_unmask(self, round: int) -> str:
        return (
            f"warning: round {round} skipped: fewer than trainer.secure_aggregation.min_survivors="
            f"{self.secure_aggregation.min_survivors} clients left to unmask; the global model is unchanged"
        )

    def _private_aggregate(
        self, round: int, updates: Sequence[ClientUpdate]
    ) -> tuple[State, State, dict[str, float]] | None:
        """Each update becomes its client's contribution to the sums (clipped under privacy), the sums are
        taken (from masked vectors under secure aggregation) and released (noised under privacy). None:
        too few clients to unmask."""
        contributions = {
            u.client_id: contribution(self.aggregator, self.global_lora, self.global_extra, u, self.privacy)
            for u in updates
        }
        if self.secure_aggregation is not None:
            if not contributions:
                return None
            totals, cost = self.secure_aggregation.sum(contributions, self.masking_context(round))
            if totals is None:
                return None
        elif contributions:
            totals, cost = add_contributions(list(contributions.values())), {}
        else:  # under DP every planned client counts; none arrived, so the release is the noise alone
            totals, cost = zero_contribution(self.global_lora, self.global_extra), {}
        lora, extra, metrics = self._release(round, totals)
        return lora, extra, {**metrics, **cost}

    def _release(self, round: int, totals: Mapping[str, Tensor]) -> tuple[State, State, dict[str, float]]:
        if self.privacy is None:
            return release(self.aggregator, self.global_lora, self.global_extra, totals, None, None)
        # the divisors are public: every planned client counts, a missing one as a zero delta
        ranks = [rank for _, rank in self.plan(round)]
        totals = {**totals, "lora_weight": coverage(ranks, self.global_rank),
                  "extra_weight": torch.tensor([float(len(ranks))], dtype=torch.float64),
                  "count": torch.tensor([float(len(ranks))], dtype=torch.float64)}  # fmt: skip
        noise = self.privacy.noise_generator(client_seed(self.seed, round, NOISE_STREAM), round)
        lora, extra, metrics = release(self.aggregator, self.global_lora, self.global_extra, totals, self.privacy,
                                       noise)  # fmt: skip
        for key, value in {**lora, **extra}.items():  # never a NaN/inf model next to an epsilon
            if not torch.isfinite(value).all():
                raise RunFailed(f"round {round}: the released {key} has non-finite values; nothing was saved", {})
        return lora, extra, metrics

    def aggregate_sums(
        self,
        round: int,
        updates: Sequence[ClientUpdate],
        rejected: Sequence[tuple[int, str]],
        totals: Mapping[str, Tensor] | None,
        cost: Mapping[str, float],
    ) -> RoundResult:
        """The round step of a server that gets only the sum of the clients' contributions (secure
        aggregation with the clients on other nodes): ``updates`` are the summed clients' reports without
        tensors (client id, rank, samples, loss, metrics, info), ``totals`` their summed contributions,
        unmasked (None: too few clients, the round is skipped).

        What needs single updates does not run: the norm rules (``update_norm_factor``; the clients
        check ``max_update_norm`` and finiteness themselves) and the personalized states, which stay on
        the clients. The release is ``aggregate``'s: same sums, same noise.
        """
        updates, rejected = list(updates), list(rejected)
        skipped = totals is None or (self.privacy is None and self.skips(len(updates)))
        privacy: dict[str, float] = dict(cost)
        if not skipped:
            counted = int(totals["count"].item())
            if counted != len(updates):
                raise ValueError(f"the summed contributions count {counted} clients, not {len(updates)}")
            self.global_lora, self.global_extra, metrics = self._release(round, totals)
            privacy = {**metrics, **privacy}
        order = {client: i for i, (client, _) in enumerate(self.plan(round))}
        rejected.sort(key=lambda r: order.get(r[0], len(order)))
        uploaded = float(cost.get("secagg/bytes_uploaded", 0.0))
        return RoundResult(round, updates, rejected, skipped, privacy=privacy, uploaded=uploaded,
                           released_only=self.released_only)  # fmt: skip

    # --------------------------------------------------------------------------------- evaluation
    def global_models(self) -> Sequence[Personal]:
        """The models evaluated as "global": the global state; under ``Local`` (nothing shared) every
        client's own model, whose figures are averaged (read from the store one at a time)."""
        if self.aggregator.communicates or self.aggregator.pooled:
            return [(self.global_rank, self.global_lora, self.global_extra)]
        return _Values(self.personal)

    def personalized_models(self, num_clients: int) -> Mapping[int, Personal]:
        """Every client's personalized model; ``Centralized`` has none: its pooled model stands for each."""
        if self.aggregator.pooled:
            return dict.fromkeys(range(num_clients), (self.global_rank, self.global_lora, self.global_extra))
        return self.personal

    # ---------------------------------------------------------------------------------- checkpoints
    def merged_modules(self) -> list[str]:
        """Modules whose base weights the aggregator changed (FLoRA's merges); a checkpoint keeps them."""
        return self.aggregator.merged_modules() if self.merges_into_base else []

    def state_dict(self) -> dict:
        """The server's state (references, not copies: the round step replaces tensors, never changes them)."""
        aggregator = self.aggregator
        return {
            "global_lora": self.global_lora,
            "global_extra": self.global_extra,
            "personal": self.personal.snapshot(),  # the checkpoint writer turns it into tensors and file names
            "aggregator": aggregator.state_dict(),
            "privacy": self.privacy.state_dict() if self.privacy is not None else {},
        }

    def load_state_dict(self, state: Mapping, device: torch.device | str = "cpu", folder: Path | None = None) -> None:
        """``folder``: the checkpoint's, which the files of spilled personalized states are relative to."""
        self.global_lora = {k: v.to(device) for k, v in state["global_lora"].items()}
        self.global_extra = {k: v.to(device) for k, v in state["global_extra"].items()}
        self.personal.load(state["personal"], folder)  # on the CPU, as the round step keeps them
        self.aggregator.load_state_dict(state["aggregator"])
        if (self.privacy is None) != (not state["privacy"]):  # a DP run resumed without DP, or the reverse
            had = "with" if state["privacy"] else "without"
            raise ConfigError(
                f"--ckpt_path: the checkpoint's rounds ran {had} trainer.privacy and this config "
                f"{'has none' if self.privacy is None else 'adds it'}; a resume must keep the privacy settings "
                "(start a new run to change them)"
            )
        if self.privacy is not None:  # the accountant goes on from the checkpoint: epsilon stays exact
            self.privacy.load_state_dict(state["privacy"])


def run_problem(skipped: Sequence[bool], rounds: int) -> str | None:
    """Why a finished run must not count as a success: no round aggregated anything, or more than half
    of its ``rounds`` were skipped (too few healthy updates). ``skipped``: one flag per completed round."""
    count = sum(bool(s) for s in skipped)
    if count == 0 or 2 * count <= rounds:
        return None
    what = "every round was skipped" if count >= rounds else f"{count} of {rounds} rounds were skipped"
    return (
        f"{what}: too few healthy client updates to aggregate (see the warnings above for each client's "
        "reason); the global model is not trained as configured"
    )


class _Values(Sequence):
    """A store's states as a sequence, each read when asked for (not all held at once)."""

    def __init__(self, store: PersonalStore) -> None:
        self.store, self.clients = store, list(store)

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, i):  # type: ignore[override]
        return self.store[self.clients[i]]


def _cpu(state: Mapping[str, Tensor]) -> State:
    return {k: v.cpu() for k, v in state.items()}
