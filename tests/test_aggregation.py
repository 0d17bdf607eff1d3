import pytest
import torch

from fedilora.aggregation import (
    ClientUpdate,
    DimensionWise,
    FedAvg,
    dimension_weights,
    dimension_wise_average,
    rank_axis,
    truncate,
    weighted_average,
)
from fedilora.errors import ConfigError
from helpers import lora_pair


def _clients(ranks, d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{**lora_pair("m1", r, d_in, d_out, g), **lora_pair("m2", r, d_out, d_in, g)} for r in ranks]


def test_equal_ranks_is_weighted_fedavg():
    clients = _clients([4, 4, 4])
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    previous = {k: torch.zeros_like(v) for k, v in clients[0].items()}
    got = dimension_wise_average(previous, clients, [4, 4, 4], weights)
    for key in previous:
        expected = sum(w * c[key] for w, c in zip(weights, clients, strict=True))
        torch.testing.assert_close(got[key], expected)


def test_single_client_returns_that_client_on_its_dimensions():
    (client,) = _clients([3])
    previous = {k: torch.full((6, v.shape[1]) if rank_axis(k) == 0 else (v.shape[0], 6), 7.0, dtype=v.dtype)
                for k, v in client.items()}  # fmt: skip
    got = dimension_wise_average(previous, [client], [3], torch.tensor([1.0]))
    for key, value in client.items():
        torch.testing.assert_close(truncate(got, 3)[key], value)
    # dimensions 3..5 were not covered: they keep the previous global values
    assert torch.equal(got["m1.lora_A.weight"][3:], previous["m1.lora_A.weight"][3:])
    assert torch.equal(got["m1.lora_B.weight"][:, 3:], previous["m1.lora_B.weight"][:, 3:])


def test_hand_computed_ranks_4_and_2_with_unequal_weights():
    # client 0: rank 4, weight 0.25, A row i == i + 1; client 1: rank 2, weight 0.75, A rows 10 and 20
    a0 = torch.arange(1.0, 5.0)[:, None].expand(4, 2).clone()
    a1 = torch.tensor([[10.0, 10.0], [20.0, 20.0]])
    b0 = torch.arange(1.0, 5.0)[None, :].expand(3, 4).clone()
    b1 = torch.tensor([[10.0, 20.0]]).expand(3, 2).clone()
    previous = {"m.lora_A.weight": torch.zeros(4, 2), "m.lora_B.weight": torch.zeros(3, 4)}
    clients = [{"m.lora_A.weight": a0, "m.lora_B.weight": b0}, {"m.lora_A.weight": a1, "m.lora_B.weight": b1}]
    got = dimension_wise_average(previous, clients, [4, 2], torch.tensor([0.25, 0.75]))
    # dim 0: 0.25*1 + 0.75*10 = 7.75; dim 1: 0.25*2 + 0.75*20 = 15.5; dims 2, 3: client 0 alone -> 3, 4
    expected = torch.tensor([7.75, 15.5, 3.0, 4.0])
    torch.testing.assert_close(got["m.lora_A.weight"], expected[:, None].expand(4, 2))
    torch.testing.assert_close(got["m.lora_B.weight"], expected[None, :].expand(3, 4))


def test_every_covered_dimension_has_total_weight_one():
    coef = dimension_weights([8, 4, 2, 2, 1], torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15]), global_rank=10)
    totals = coef.sum(dim=0)
    torch.testing.assert_close(totals[:8], torch.ones(8, dtype=totals.dtype))
    assert torch.equal(totals[8:], torch.zeros(2, dtype=totals.dtype))  # no client has dims 8, 9
    assert (coef[1:, 4:] == 0).all()  # clients of rank <= 4 contribute nothing beyond their rank


def test_uncovered_dimensions_keep_previous_values():
    clients = _clients([2, 1])
    previous = {k: torch.randn(6, v.shape[1], dtype=v.dtype) if rank_axis(k) == 0 else torch.randn(v.shape[0], 6,
                dtype=v.dtype) for k, v in clients[0].items()}  # fmt: skip
    got = dimension_wise_average(previous, clients, [2, 1], torch.tensor([0.5, 0.5]))
    for key, prev in previous.items():
        if rank_axis(key) == 0:
            assert torch.equal(got[key][2:], prev[2:])
            assert not torch.equal(got[key][:2], prev[:2])
        else:
            assert torch.equal(got[key][:, 2:], prev[:, 2:])


def test_a_and_b_are_told_apart_by_name_when_d_in_equals_rank():
    # A is [r, d_in] with d_in == r == 2 and B is [d_out, r] = [2, 2]: shapes alone cannot tell the rank axis
    a = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[10.0, 20.0]])]
    b = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[10.0], [20.0]])]
    clients = [{"x.lora_A.weight": a[0], "x.lora_B.weight": b[0]}, {"x.lora_A.weight": a[1], "x.lora_B.weight": b[1]}]
    previous = {"x.lora_A.weight": torch.zeros(2, 2), "x.lora_B.weight": torch.zeros(2, 2)}
    got = dimension_wise_average(previous, clients, [2, 1], torch.tensor([0.5, 0.5]))
    # A row 0 averages (1, 2) and (10, 20); B column 0 averages (1, 3) and (10, 20)
    torch.testing.assert_close(got["x.lora_A.weight"], torch.tensor([[5.5, 11.0], [3.0, 4.0]]))
    torch.testing.assert_close(got["x.lora_B.weight"], torch.tensor([[5.5, 2.0], [11.5, 4.0]]))


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32])
def test_broadcast_truncates_to_every_rank(rank):
    g = torch.Generator().manual_seed(1)
    global_lora = {**lora_pair("m", 32, 48, 40, g), **lora_pair("n", 32, 32, 32, g)}
    sent = DimensionWise().broadcast(global_lora, rank)
    assert sent["m.lora_A.weight"].shape == (rank, 48) and sent["m.lora_B.weight"].shape == (40, rank)
    assert sent["n.lora_A.weight"].shape == (rank, 32) and sent["n.lora_B.weight"].shape == (32, rank)
    assert torch.equal(sent["m.lora_A.weight"], global_lora["m.lora_A.weight"][:rank])
    assert torch.equal(sent["m.lora_B.weight"], global_lora["m.lora_B.weight"][:, :rank])
    sent["m.lora_A.weight"].add_(1.0)  # a copy: a client training in place never touches the global adapter
    assert not torch.equal(sent["m.lora_A.weight"], global_lora["m.lora_A.weight"][:rank])


def _updates(ranks, counts):
    return [
        ClientUpdate(client_id=k, rank=r, num_samples=n, lora=c, extra={})
        for k, (r, n, c) in enumerate(zip(ranks, counts, _clients(ranks), strict=True))
    ]


def test_dimension_wise_aggregator_weights_by_samples():
    updates = _updates([4, 4], [100, 300])
    previous = {k: torch.zeros_like(v) for k, v in updates[0].lora.items()}
    got = DimensionWise().aggregate(previous, updates)
    expected = weighted_average([u.lora for u in updates], torch.tensor([0.25, 0.75]))
    for key in got:
        torch.testing.assert_close(got[key], expected[key])
    torch.testing.assert_close(got, FedAvg().aggregate(previous, updates))


def test_fedavg_refuses_heterogeneous_ranks():
    updates = _updates([4, 2], [1, 1])
    with pytest.raises(ConfigError, match="FedAvg needs equal ranks"):
        FedAvg().aggregate({k: torch.zeros(4, 1) for k in updates[0].lora}, updates)


def test_update_byte_count():
    update = ClientUpdate(
        0, 2, 1, {"m.lora_A.weight": torch.zeros(2, 5)}, {"head.w": torch.zeros(3, dtype=torch.float64)}
    )
    assert update.nbytes() == 2 * 5 * 4 + 3 * 8
