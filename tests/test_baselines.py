"""Baseline aggregators: HetLoRA, FLoRA, FlexLoRA (tiny float64 tensors, hand-computed values)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedilora.aggregation import ClientUpdate, dimension_wise_average, truncate
from fedilora.baselines import (
    FlexLoRA,
    FLoRA,
    HetLoRA,
    dense_truncated_factors,
    hetlora_weights,
    lora_deltas,
    low_rank_svd,
    module_keys,
    product_norm,
    stack_loras,
    truncated_factors,
    zero_padded_average,
)
from helpers import SHAPES, make_lora

# two modules; for "n" d_in equals the largest rank, so A and B must be told apart by name
A = "visual.m.c_fc.lora_A.weight"
B = "visual.m.c_fc.lora_B.weight"


def update(k: int, lora: dict[str, Tensor], n: int) -> ClientUpdate:
    return ClientUpdate(client_id=k, rank=lora[A].shape[0], num_samples=n, lora=lora, extra={})


def mixture(loras: list[dict[str, Tensor]], p: list[float], scale: float = 1.0) -> dict[str, Tensor]:
    """sum_k p_k s B_k A_k per module, materialised."""
    return {
        prefix: sum(w * scale * lo[b] @ lo[a] for w, lo in zip(p, loras, strict=True))
        for prefix, (a, b) in module_keys(loras[0]).items()
    }


def test_module_keys_pairs_a_and_b_by_prefix() -> None:
    assert module_keys(make_lora(2, 0)) == {
        "visual.m.c_fc": (A, B),
        "n": ("n.lora_A.weight", "n.lora_B.weight"),
    }


# --------------------------------------------------------------------------------------------- HetLoRA


def test_hetlora_weights_hand_computed() -> None:
    # client 0: ||B A||_F = 2 (module m) + 1 (module n) = 3; client 1: 0 + 1 = 1 -> weights 3/4, 1/4
    def lora(m_b: float, n_b: float) -> dict[str, Tensor]:
        e = torch.zeros(1, 2, dtype=torch.float64)
        e[0, 0] = 1.0
        return {
            "m.lora_A.weight": e,
            "m.lora_B.weight": torch.tensor([[m_b], [0.0]], dtype=torch.float64),
            "n.lora_A.weight": e,
            "n.lora_B.weight": torch.tensor([[0.0], [n_b]], dtype=torch.float64),
        }

    w = hetlora_weights([lora(2.0, -1.0), lora(0.0, 1.0)])
    assert torch.allclose(w, torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_product_norm_matches_materialised_frobenius_norm() -> None:
    lo = make_lora(3, 1)
    assert torch.allclose(product_norm(lo[B], lo[A]), torch.linalg.matrix_norm(lo[B] @ lo[A]))


def test_hetlora_weights_uniform_when_all_updates_are_zero() -> None:
    zero = {k: torch.zeros_like(v) for k, v in make_lora(2, 0).items()}
    assert torch.equal(hetlora_weights([zero, zero]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_zero_padding_dilutes_where_dimension_wise_does_not() -> None:
    wide, narrow = make_lora(2, 0), make_lora(1, 1)
    previous = {k: torch.zeros_like(v) for k, v in wide.items()}
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    padded = zero_padded_average(previous, [wide, narrow], w)
    fair = dimension_wise_average(previous, [wide, narrow], [2, 1], w)
    unnormalised = zero_padded_average(previous, [wide, narrow], 2 * w)
    assert all(torch.allclose(unnormalised[k], padded[k]) for k in padded)
    # dimension 1 only exists on the rank-2 client
    assert torch.allclose(padded[A][1], 0.5 * wide[A][1])
    assert torch.allclose(padded[B][:, 1], 0.5 * wide[B][:, 1])
    assert torch.allclose(fair[A][1], wide[A][1])
    # dimension 0 is shared: both methods give the plain mean
    assert torch.allclose(padded[A][0], 0.5 * (wide[A][0] + narrow[A][0]))
    assert torch.allclose(fair[A][0], padded[A][0])


def test_hetlora_aggregate_uses_norm_weights_not_sample_counts() -> None:
    loras = [make_lora(2, 0), make_lora(1, 1)]
    previous = {k: torch.zeros_like(v) for k, v in loras[0].items()}
    out = HetLoRA().aggregate(previous, [update(0, loras[0], 1), update(1, loras[1], 99)])
    expected = zero_padded_average(previous, loras, hetlora_weights(loras))
    assert out.keys() == previous.keys()
    for k in out:
        assert out[k].shape == previous[k].shape
        assert torch.allclose(out[k], expected[k])
    assert not torch.allclose(out[A], zero_padded_average(previous, loras, torch.tensor([0.01, 0.99]))[A])


# ----------------------------------------------------------------------------------------------- FLoRA


def test_flora_stacked_product_is_exact_weighted_sum() -> None:
    loras = [make_lora(r, seed) for seed, r in enumerate((4, 2, 1))]
    p = [0.5, 0.3, 0.2]
    stacked = stack_loras(loras, torch.tensor(p, dtype=torch.float64))
    assert stacked[A].shape == (7, 6) and stacked[B].shape == (5, 7)
    assert stacked["n.lora_A.weight"].shape == (7, 4)
    deltas, expected = lora_deltas(stacked), mixture(loras, p)
    for prefix in SHAPES:
        assert torch.allclose(deltas[prefix], expected[prefix], atol=1e-12)


def test_lora_deltas_hand_computed() -> None:
    lora = {
        "m.lora_A.weight": torch.tensor([[1.0, 2.0]]),
        "m.lora_B.weight": torch.tensor([[3.0], [4.0]]),
    }
    deltas = lora_deltas(lora, scale=2.0)
    assert list(deltas) == ["m"]
    assert torch.equal(deltas["m"], torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_flora_aggregate_reinitialises_and_accumulates_merged_delta() -> None:
    global_lora = make_lora(4, 9)
    agg = FLoRA().setup(scale=2.0)
    assert FLoRA.merges_into_base
    rounds = [[make_lora(4, 0), make_lora(2, 1)], [make_lora(1, 2), make_lora(4, 3)]]
    total = {prefix: torch.zeros(shape, dtype=torch.float64) for prefix, shape in SHAPES.items()}
    for loras in rounds:
        out = agg.aggregate(global_lora, [update(0, loras[0], 3), update(1, loras[1], 1)])
        expected = mixture(loras, [0.75, 0.25], scale=2.0)
        for prefix in SHAPES:
            assert torch.allclose(agg.last_delta[prefix], expected[prefix], atol=1e-12)
            total[prefix] += expected[prefix]
        # previous A kept (random init), B zeroed: the fresh adapter adds nothing after the merge
        assert torch.equal(out[A], global_lora[A]) and out[A] is not global_lora[A]
        assert torch.equal(out[B], torch.zeros_like(global_lora[B]))
    state = agg.state_dict()
    for prefix in SHAPES:
        assert torch.allclose(state[prefix], total[prefix], atol=1e-12)
    restored = FLoRA().setup(scale=2.0)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.state_dict()[p], state[p]) for p in SHAPES)


# -------------------------------------------------------------------------------------------- FlexLoRA


@pytest.mark.parametrize(("d_out", "d_in", "m"), [(6, 5, 3), (3, 8, 7), (9, 4, 6)])
def test_qr_route_matches_dense_truncated_svd(d_out: int, d_in: int, m: int) -> None:
    g = torch.Generator().manual_seed(d_out * 100 + d_in)
    b = torch.randn(d_out, m, generator=g, dtype=torch.float64)
    a = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    u, s, v = low_rank_svd(b, a)
    assert torch.all(s[:-1] >= s[1:])
    for rank in range(1, min(d_out, d_in, m) + 1):
        b_r, a_r = truncated_factors(u, s, v, rank, scale=0.5)
        b_d, a_d = dense_truncated_factors(b @ a, rank, scale=0.5)
        assert b_r.shape == (d_out, rank) and a_r.shape == (rank, d_in)
        assert torch.allclose(b_r @ a_r, b_d @ a_d, atol=1e-10)
        # Eckart-Young: the error of the best rank-r approximation is the tail of the spectrum
        err = torch.linalg.matrix_norm(b @ a - 0.5 * b_r @ a_r)
        assert torch.allclose(err, s[rank:].square().sum().sqrt(), atol=1e-10)


def test_truncated_factors_pad_with_zeros_beyond_available_rank() -> None:
    u, s, v = low_rank_svd(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    b_r, a_r = truncated_factors(u, s, v, 4)
    assert b_r.shape == (5, 4) and a_r.shape == (4, 4)
    assert not b_r[:, 2:].any() and not a_r[2:].any()


def test_flexlora_broadcasts_each_client_its_rank() -> None:
    loras = [make_lora(r, seed) for seed, r in enumerate((4, 2, 1))]
    global_lora = {k: torch.zeros_like(v) for k, v in loras[0].items()}
    agg = FlexLoRA().setup(scale=2.0)
    # before any aggregation: plain truncation
    assert all(torch.equal(agg.broadcast(loras[0], 2)[k], truncate(loras[0], 2)[k]) for k in loras[0])
    counts = (1, 2, 1)
    new = agg.aggregate(global_lora, [update(k, lo, counts[k]) for k, lo in enumerate(loras)])
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in global_lora.items()}
    target = mixture(loras, [0.25, 0.5, 0.25], scale=2.0)
    for rank in (4, 2, 1):
        sent = agg.broadcast(new, rank)
        assert sent[A].shape == (rank, 6) and sent[B].shape == (5, rank)
        assert sent["n.lora_A.weight"].shape == (rank, 4) and sent["n.lora_B.weight"].shape == (3, rank)
        for prefix, (a, b) in module_keys(sent).items():
            b_d, a_d = dense_truncated_factors(target[prefix], rank, scale=2.0)
            assert torch.allclose(sent[b] @ sent[a], b_d @ a_d, atol=1e-10)
        # SVD factors are ordered by singular value, so the broadcast is the truncated global
        assert all(torch.allclose(sent[k], truncate(new, rank)[k]) for k in sent)


def test_flexlora_exact_when_rank_covers_all_client_ranks() -> None:
    loras = [make_lora(2, 0), make_lora(1, 1)]  # sum r_k = 3 < global rank 4
    global_lora = make_lora(4, 5)
    agg = FlexLoRA().setup(scale=0.5)
    new = agg.aggregate(global_lora, [update(0, loras[0], 1), update(1, loras[1], 3)])
    target = mixture(loras, [0.25, 0.75], scale=0.5)
    for lora in (new, agg.broadcast(new, 3)):
        for prefix, (a, b) in module_keys(lora).items():
            assert torch.allclose(0.5 * lora[b] @ lora[a], target[prefix], atol=1e-10)
    assert not new[A][3].any() and not new[B][:, 3].any()  # padded beyond sum r_k
