"""The 2025-2026 heterogeneous-rank baselines: FedEx-LoRA, HLoRA, RB-LoRA (and Fed-PLoRA's server side).

Each against a tiny case computed by hand from its paper's formula, then its defining properties on
random float64 adapters, and its refusal where differential privacy or secure aggregation cannot work.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedilora.algorithms.dimension_wise import DimensionWise
from fedilora.algorithms.fedavg import FedAvg
from fedilora.algorithms.fedexlora import FedExLoRA
from fedilora.algorithms.fedplora import FedPLoRA, client_payload, select_modules
from fedilora.algorithms.flexlora import FlexLoRA, dense_truncated_factors
from fedilora.algorithms.hlora import HLoRA
from fedilora.algorithms.rblora import RBLoRA
from fedilora.errors import ConfigError
from fedilora.lora_ops import module_keys, truncate
from fedilora.privacy.dp import DifferentialPrivacy
from fedilora.privacy.rounds import add_contributions, contribution, release
from fedilora.privacy.secagg import SecureAggregation
from fedilora.types import ClientUpdate
from helpers import SHAPES, make_lora

# two modules; for "n" d_in equals the global rank, so A and B must be told apart by name
GLOBAL_RANK = 3
A, B = "m.lora_A.weight", "m.lora_B.weight"  # the hand-computed cases' single module "m"


def update(k: int, lora: dict[str, Tensor], n: int, extra: dict[str, Tensor] | None = None) -> ClientUpdate:
    rank = next(v.shape[0] for key, v in lora.items() if ".lora_A." in key)
    return ClientUpdate(client_id=k, rank=rank, num_samples=n, lora=lora, extra=extra or {})


def products(lora: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    return {prefix: scale * lora[b] @ lora[a] for prefix, (a, b) in module_keys(lora).items()}


def mixture(updates: list[ClientUpdate], scale: float = 1.0) -> dict[str, Tensor]:
    """sum_k p_k s B_k A_k per module, materialised."""
    total = sum(u.num_samples for u in updates)
    out: dict[str, Tensor] = {}
    for u in updates:
        for prefix, dw in products(u.lora, scale).items():
            out[prefix] = out.get(prefix, 0) + u.num_samples / total * dw
    return out


def best_rank(dw: Tensor, rank: int) -> Tensor:
    """The best rank-``rank`` approximation of ``dw`` (Eckart-Young), from a dense SVD."""
    b, a = dense_truncated_factors(dw, rank)
    return b @ a


def hand_lora(b: list[list[float]], a: list[list[float]]) -> dict[str, Tensor]:
    return {A: torch.tensor(a, dtype=torch.float64), B: torch.tensor(b, dtype=torch.float64)}


HETEROGENEOUS = [update(0, make_lora(3, 1), 20), update(1, make_lora(2, 2), 50), update(2, make_lora(1, 3), 30)]


# ------------------------------------------------------------------------------------------- FedEx-LoRA
def test_fedexlora_hand_computed_factors_and_residual() -> None:
    # client 1: rank 2, B1 A1 = [1, 1]; client 2: rank 1, B2 A2 = [6, 0]; p = 1/2 each, s = 2
    clients = [
        update(0, hand_lora([[1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]), 5),
        update(1, hand_lora([[3.0]], [[2.0, 0.0]]), 5),
    ]
    agg = FedExLoRA().setup(scale=2.0)
    out = agg.aggregate(hand_lora([[9.0, 9.0]], [[9.0, 9.0], [9.0, 9.0]]), clients)
    # zero padding: A_g = [[1.5, 0], [0, 0.5]], B_g = [[2, 0.5]] -> B_g A_g = [3, 0.25]
    torch.testing.assert_close(out[A], torch.tensor([[1.5, 0.0], [0.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(out[B], torch.tensor([[2.0, 0.5]], dtype=torch.float64))
    # residual s (sum p_k B_k A_k - B_g A_g) = 2 ([3.5, 0.5] - [3, 0.25]) = [1, 0.5]
    torch.testing.assert_close(agg.last_delta["m"], torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    assert agg.merged_modules() == ["m"]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fedexlora_global_model_is_the_exact_average_of_the_client_models(scale: float) -> None:
    base = {prefix: torch.randn(d_out, d_in, dtype=torch.float64) for prefix, (d_out, d_in) in SHAPES.items()}
    agg = FedExLoRA().setup(scale)
    out = agg.aggregate(make_lora(GLOBAL_RANK, 0), HETEROGENEOUS)
    target = mixture(HETEROGENEOUS, scale)
    for prefix, (a, b) in module_keys(out).items():
        new_model = base[prefix] + agg.last_delta[prefix] + scale * out[b] @ out[a]
        torch.testing.assert_close(new_model, base[prefix] + target[prefix], rtol=0, atol=1e-12)
        # the factors alone are not exact here: the residual carries a real correction
        assert (agg.last_delta[prefix].abs() > 1e-6).any()


def test_fedexlora_equal_ranks_factors_are_fedavg_and_one_client_has_no_residual() -> None:
    equal = [update(0, make_lora(2, 4), 10), update(1, make_lora(2, 5), 30)]
    previous = make_lora(2, 0)
    fedex = FedExLoRA().setup(1.0)
    out = fedex.aggregate(previous, equal)
    fedavg = FedAvg().aggregate(previous, equal)
    for key in out:
        torch.testing.assert_close(out[key], fedavg[key], rtol=0, atol=1e-12)
    alone = FedExLoRA().setup(1.0)
    out = alone.aggregate(previous, [equal[0]])
    for key in out:
        torch.testing.assert_close(out[key], equal[0].lora[key], rtol=0, atol=1e-12)
    for delta in alone.last_delta.values():
        assert delta.abs().max() < 1e-12


@pytest.mark.slow
def test_fedexlora_run_adds_every_residual_to_the_base_weights(tmp_path) -> None:
    from fedilora.model import LoRACLIPClassifier
    from fedilora.trainer import FederatedTrainer
    from helpers import tiny_datamodule

    aggregator = FedExLoRA()
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12)
    trainer = FederatedTrainer(rounds=2, clients_per_round=3, ranks=[4, 2, 1], max_local_steps=2,
                               aggregator=aggregator, root_dir=str(tmp_path), progress=False)  # fmt: skip
    trainer.fit(model, tiny_datamodule(num_clients=3))
    torch.manual_seed(trainer.seed)  # the trainer seeds the backbone's initialisation the same way
    fresh = LoRACLIPClassifier(num_classes=12)
    fresh.configure_model()
    fresh.add_ranks([4])
    assert aggregator.merged_modules()
    for prefix, merged in aggregator.merged.items():
        assert merged.abs().max() > 0  # heterogeneous ranks: a real residual every round
        moved = model.base_weight(prefix) - fresh.base_weight(prefix)
        torch.testing.assert_close(moved, merged, atol=1e-6, rtol=1e-5)


def test_fedexlora_merges_accumulate_and_survive_a_checkpoint() -> None:
    agg = FedExLoRA().setup(1.0)
    agg.aggregate(make_lora(GLOBAL_RANK, 0), HETEROGENEOUS)
    first = {k: v.clone() for k, v in agg.last_delta.items()}
    agg.aggregate(make_lora(GLOBAL_RANK, 0), HETEROGENEOUS[:2])
    for prefix in first:
        torch.testing.assert_close(agg.merged[prefix], first[prefix] + agg.last_delta[prefix])
    again = FedExLoRA()
    again.load_state_dict(agg.state_dict())
    assert again.merged_modules() == agg.merged_modules()
    for prefix in first:
        torch.testing.assert_close(again.merged[prefix], agg.merged[prefix])


def test_fedexlora_stream_merged_from_two_halves_equals_one_stream() -> None:
    agg = FedExLoRA().setup(1.0)
    previous = make_lora(GLOBAL_RANK, 0)
    whole = agg.aggregate(previous, HETEROGENEOUS)
    residual = dict(agg.last_delta)
    left, right = agg.begin(previous), agg.begin(previous)
    left.add(HETEROGENEOUS[0])
    right.add(HETEROGENEOUS[1]).add(HETEROGENEOUS[2])
    halves = agg.finish(left.merge(right))
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=0, atol=1e-12)
    for prefix in residual:
        torch.testing.assert_close(agg.last_delta[prefix], residual[prefix], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ HLoRA
def test_hlora_hand_computed_bank() -> None:
    # B1 A1 = [[2, 0], [0, 0]], B2 A2 = [[0, 0], [0, 1]], p = 1/2, s = 2: dW = sum p_k s B_k A_k = diag(2, 1)
    clients = [
        update(0, hand_lora([[2.0], [0.0]], [[1.0, 0.0]]), 1),
        update(1, hand_lora([[0.0], [1.0]], [[0.0, 1.0]]), 1),
    ]
    out = HLoRA().setup(scale=2.0).aggregate(hand_lora([[0.0], [0.0]], [[1.0, 1.0]]), clients)
    # global rank 1: the best rank-1 approximation diag(2, 0); B = U = [[1], [0]], A = S V^T / s = [[1, 0]]
    sign = out[B][0, 0].sign()
    torch.testing.assert_close(out[B] * sign, torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    torch.testing.assert_close(out[A] * sign, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    # FedAvg of the same (equal-rank) factors would give [[0.5, 0.5], [0.25, 0.25]]: the bank is not that
    fedavg = FedAvg().aggregate(hand_lora([[0.0], [0.0]], [[1.0, 1.0]]), clients)
    assert not torch.allclose(fedavg[B] @ fedavg[A], out[B] @ out[A])


def test_hlora_bank_is_the_best_rank_r_approximation_of_the_averaged_product() -> None:
    scale = 0.5
    agg = HLoRA().setup(scale)
    out = agg.aggregate(make_lora(GLOBAL_RANK, 0), HETEROGENEOUS)
    target = mixture(HETEROGENEOUS, scale)
    for rank in (GLOBAL_RANK, 2, 1):  # what a client of that rank receives: the bank truncated
        sent = agg.broadcast(out, rank)
        for prefix, dw in products(sent, scale).items():
            torch.testing.assert_close(dw, best_rank(target[prefix], rank), rtol=0, atol=1e-10)
    for _, b in module_keys(out).values():  # B orthonormal: the singular values sit in A
        torch.testing.assert_close(out[b].T @ out[b], torch.eye(GLOBAL_RANK, dtype=torch.float64), atol=1e-12, rtol=0)
    # the same product as FlexLoRA, other factors (FlexLoRA splits sqrt(S) between them)
    flex = FlexLoRA().setup(scale).aggregate(make_lora(GLOBAL_RANK, 0), HETEROGENEOUS)
    for a, b in module_keys(out).values():
        torch.testing.assert_close(out[b] @ out[a], flex[b] @ flex[a], rtol=0, atol=1e-10)
        assert not torch.allclose(out[b].abs(), flex[b].abs())


def test_hlora_one_client_or_equal_ranks_at_the_global_rank_give_back_the_product() -> None:
    alone = update(0, make_lora(GLOBAL_RANK, 7), 10)
    out = HLoRA().setup(1.0).aggregate(make_lora(GLOBAL_RANK, 0), [alone])
    for prefix, dw in products(out).items():
        torch.testing.assert_close(dw, products(alone.lora)[prefix], rtol=0, atol=1e-10)
    # two clients of rank 1 each into a rank-3 bank: the rank-2 average fits, nothing is lost
    pair = [update(0, make_lora(1, 8), 10), update(1, make_lora(1, 9), 30)]
    out = HLoRA().setup(1.0).aggregate(make_lora(GLOBAL_RANK, 0), pair)
    for prefix, dw in products(out).items():
        torch.testing.assert_close(dw, mixture(pair)[prefix], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- RB-LoRA
def test_rblora_hand_computed_rule_and_rebase() -> None:
    # client 1 (rank 2, n=1): B1 = I, A1 = diag(3, 1); client 2 (rank 1, n=3): B2 = [[1], [0]], A2 = [[1, 0]]
    clients = [
        update(0, hand_lora([[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]), 1),
        update(1, hand_lora([[1.0], [0.0]], [[1.0, 0.0]]), 3),
    ]
    agg = RBLoRA().setup(1.0)
    out = agg.aggregate(hand_lora([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]), clients)
    # dim 0 over both (weights 1/4, 3/4): A_g[0] = [1.5, 0], B_g[:, 0] = [1, 0]; dim 1 client 1 alone:
    # A_g[1] = [0, 1], B_g[:, 1] = [0, 1]  ->  s B_g A_g = diag(1.5, 1)
    torch.testing.assert_close(out[B] @ out[A], torch.diag(torch.tensor([1.5, 1.0], dtype=torch.float64)))
    # re-based: B = U S = diag(1.5, 1) up to signs, A = V^T orthonormal
    torch.testing.assert_close(out[B].abs(), torch.diag(torch.tensor([1.5, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(out[A] @ out[A].T, torch.eye(2, dtype=torch.float64))
    # a rank-1 client receives diag(1.5, 0); the average of the products (FlexLoRA, HLoRA) is diag(1.5, 0.25)
    sent = agg.broadcast(out, 1)
    torch.testing.assert_close(sent[B] @ sent[A], torch.diag(torch.tensor([1.5, 0.0], dtype=torch.float64)))
    flex = FlexLoRA().setup(1.0).aggregate(hand_lora([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]), clients)
    torch.testing.assert_close(flex[B] @ flex[A], torch.diag(torch.tensor([1.5, 0.25], dtype=torch.float64)))


def test_rblora_sends_the_best_rank_r_approximation_where_truncation_would_not() -> None:
    # the global product diag(1, 2): the stronger direction is the second dimension
    previous = hand_lora([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])
    clients = [update(0, previous, 1)]
    rebased = RBLoRA().setup(1.0).aggregate(previous, clients)
    sent = RBLoRA().setup(1.0).broadcast(rebased, 1)
    torch.testing.assert_close(sent[B] @ sent[A], torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    truncated = truncate(previous, 1)  # FediLoRA's broadcast keeps the weaker first dimension
    torch.testing.assert_close(truncated[B] @ truncated[A], torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_rblora_global_product_is_fedilora_and_every_broadcast_the_best_rank_r() -> None:
    previous = RBLoRA().setup(1.0).aggregate(make_lora(GLOBAL_RANK, 0), [update(9, make_lora(GLOBAL_RANK, 6), 1)])
    # ranks 2 and 1 only: dimension 2 is uncovered and keeps its (re-based) previous value
    clients = HETEROGENEOUS[1:]
    out = RBLoRA().setup(1.0).aggregate(previous, clients)
    fedilora = DimensionWise().aggregate(previous, clients)
    for prefix, dw in products(out).items():
        torch.testing.assert_close(dw, products(fedilora)[prefix], rtol=0, atol=1e-10)
        for rank in (1, 2):
            sent = products(RBLoRA().broadcast(out, rank))[prefix]
            torch.testing.assert_close(sent, best_rank(dw, rank), rtol=0, atol=1e-10)


def test_rblora_runs_on_secure_aggregation_sums_with_the_same_result() -> None:
    agg = RBLoRA().setup(1.0)
    previous = make_lora(GLOBAL_RANK, 0)
    head = {"head.w": torch.zeros(2, dtype=torch.float64)}
    heads = [{"head.w": torch.full((2,), float(u.client_id), dtype=torch.float64)} for u in HETEROGENEOUS]
    clients = [update(u.client_id, u.lora, u.num_samples, h) for u, h in zip(HETEROGENEOUS, heads, strict=True)]
    totals = add_contributions([contribution(agg, previous, head, u, None) for u in clients])
    lora, extra, _ = release(agg, previous, head, totals, None, None)
    direct = agg.aggregate(previous, clients)
    for key in direct:
        torch.testing.assert_close(lora[key], direct[key], rtol=0, atol=1e-10)
    torch.testing.assert_close(extra["head.w"], torch.full((2,), (0 * 20 + 1 * 50 + 2 * 30) / 100, dtype=torch.float64))


# ------------------------------------------------------------------------------ Fed-PLoRA (server side)
def selected(k: int, lora: dict[str, Tensor], n: int, modules: list[int]) -> ClientUpdate:
    u = update(k, lora, n)
    u.info["modules"] = modules
    return u


def test_fedplora_hand_computed_per_module_average() -> None:
    previous = hand_lora([[1.0, 2.0, 3.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # R = 3
    clients = [
        selected(0, hand_lora([[5.0, 7.0]], [[2.0, 0.0], [4.0, 4.0]]), 1, [0, 2]),
        selected(1, hand_lora([[3.0]], [[0.0, 4.0]]), 3, [2]),
    ]
    out = FedPLoRA().setup(1.0).aggregate(previous, clients)
    # module 0: client 0 alone; module 1: trained by nobody, kept; module 2: (1 * c0 + 3 * c1) / 4
    torch.testing.assert_close(out[A], torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(out[B], torch.tensor([[5.0, 2.0, 4.0]], dtype=torch.float64))


def test_fedplora_client_starts_from_the_global_model_exactly() -> None:
    scale = 0.5
    global_lora = make_lora(GLOBAL_RANK, 0)
    agg = FedPLoRA(seed=3).setup(scale)
    trainable, fold, modules = agg.payload(global_lora, round=4, client=2, rank=2)
    assert modules == select_modules(3, 4, 2, 2, GLOBAL_RANK) and len(set(modules)) == 2
    for prefix, (a, b) in module_keys(global_lora).items():
        assert trainable[a].shape[0] == 2
        torch.testing.assert_close(trainable[a], global_lora[a][modules])
        started = fold[prefix] + scale * trainable[b] @ trainable[a]
        torch.testing.assert_close(started, scale * global_lora[b] @ global_lora[a], rtol=0, atol=1e-12)
    # the draw depends on the round: over rounds a rank-1 client meets every module
    drawn = {m for r in range(40) for m in select_modules(3, r, 2, 1, GLOBAL_RANK)}
    assert drawn == set(range(GLOBAL_RANK))
    _, fold_all = client_payload(global_lora, list(range(GLOBAL_RANK)), scale)
    assert all(f.abs().max() == 0 for f in fold_all.values())  # training every module folds nothing


def test_fedplora_every_module_trained_by_all_is_fedavg_and_a_silent_update_is_refused() -> None:
    previous = make_lora(GLOBAL_RANK, 0)
    clients = [selected(k, make_lora(GLOBAL_RANK, 10 + k), 10 * (k + 1), [0, 1, 2]) for k in range(2)]
    out = FedPLoRA().setup(1.0).aggregate(previous, clients)
    fedavg = FedAvg().aggregate(previous, clients)
    for key in out:
        torch.testing.assert_close(out[key], fedavg[key], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not say which rank-1 modules"):
        FedPLoRA().setup(1.0).aggregate(previous, [update(0, make_lora(2, 1), 5)])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        FedPLoRA().setup(1.0).aggregate(previous, [selected(0, make_lora(2, 1), 5, [0, 3])])
    with pytest.raises(ConfigError, match="FedPLoRA needs each client to fold"):
        FedPLoRA().setup(1.0).broadcast(previous, 2)


# --------------------------------------------------------------------------------- privacy: clean refusals
@pytest.mark.parametrize(
    ("method", "dp_reason", "secagg_reason"),
    [
        ("FedExLoRA", "residual", "dense products"),
        ("HLoRA", "SVD of the averaged products", "must see every update"),
        ("RBLoRA", "re-basis is not linear", None),
        ("FedPLoRA", "randomly drawn set of modules", "not part of the masked"),
    ],
)
def test_privacy_is_refused_with_the_reason_where_it_cannot_work(method, dp_reason, secagg_reason) -> None:
    with pytest.raises(ConfigError, match=f"trainer.privacy: not available with {method}: .*{dp_reason}"):
        DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.0).setup(method, 10, 4, 5)
    if secagg_reason is None:
        SecureAggregation().setup(method)  # supported: the server re-bases what the masked sums give
    else:
        refused = f"trainer.secure_aggregation: not available with {method}: .*{secagg_reason}"
        with pytest.raises(ConfigError, match=refused):
            SecureAggregation().setup(method)
