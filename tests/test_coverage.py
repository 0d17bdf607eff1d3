"""fedilora.coverage: dimension-wise averaging of updates, a client without a dimension counting as no change."""

import torch

from fedilora.aggregation import ClientUpdate, truncate, weighted_average
from fedilora.coverage import DimensionWiseDelta, coverage_mass, dimension_wise_delta_average
from helpers import lora_pair


def test_delta_average_hand_computed():
    previous = {
        "m.lora_A.weight": torch.tensor([[1.0], [2.0], [3.0]]),
        "m.lora_B.weight": torch.tensor([[1.0, 2.0, 3.0]]),
    }
    big = {"m.lora_A.weight": torch.tensor([[5.0], [6.0], [7.0]]), "m.lora_B.weight": torch.tensor([[5.0, 6.0, 7.0]])}
    small = {"m.lora_A.weight": torch.tensor([[9.0]]), "m.lora_B.weight": torch.tensor([[9.0]])}
    weights = torch.tensor([30.0, 10.0])  # p = 0.75, 0.25
    torch.testing.assert_close(coverage_mass([3, 1], weights, 3), torch.tensor([1.0, 0.75, 0.75], dtype=torch.float64))
    out = dimension_wise_delta_average(previous, [big, small], [3, 1], weights)
    # dim 0: 1 + 0.75 * (5 - 1) + 0.25 * (9 - 1) = 6; dims 1, 2: prev + 0.75 * (big - prev) (small: no change)
    expected = torch.tensor([6.0, 2 + 0.75 * 4, 3 + 0.75 * 4])
    torch.testing.assert_close(out["m.lora_A.weight"], expected.view(3, 1))
    torch.testing.assert_close(out["m.lora_B.weight"], expected.view(1, 3))


def test_delta_average_equal_ranks_is_fedavg_and_one_client_is_that_client():
    g = torch.Generator().manual_seed(0)
    previous = lora_pair("m", 4, 6, 5, g)
    clients = [lora_pair("m", 4, 6, 5, g) for _ in range(3)]
    weights = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    fedavg = weighted_average(clients, weights)
    out = dimension_wise_delta_average(previous, clients, [4, 4, 4], weights)
    for key in previous:
        torch.testing.assert_close(out[key], fedavg[key])
    low = lora_pair("m", 2, 6, 5, g)
    alone = dimension_wise_delta_average(previous, [low], [2], torch.tensor([3.0]))
    torch.testing.assert_close(alone["m.lora_A.weight"][:2], low["m.lora_A.weight"])
    torch.testing.assert_close(alone["m.lora_A.weight"][2:], previous["m.lora_A.weight"][2:])  # uncovered: kept
    torch.testing.assert_close(alone["m.lora_B.weight"][:, :2], low["m.lora_B.weight"])
    torch.testing.assert_close(alone["m.lora_B.weight"][:, 2:], previous["m.lora_B.weight"][:, 2:])


def test_delta_average_is_fedavg_of_updates_with_frozen_dimensions():
    # a rank-r client is a rank-R client whose dimensions >= r stayed at the broadcast values
    g = torch.Generator().manual_seed(1)
    previous = lora_pair("m", 8, 6, 5, g)
    ranks, counts = [8, 4, 2], [40, 25, 35]
    updates = []
    padded = []
    for k, (r, n) in enumerate(zip(ranks, counts, strict=True)):
        trained = {
            key: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for key, v in truncate(previous, r).items()
        }
        updates.append(ClientUpdate(k, r, n, trained, {}))
        full = {key: v.clone() for key, v in previous.items()}
        full["m.lora_A.weight"][:r] = trained["m.lora_A.weight"]
        full["m.lora_B.weight"][:, :r] = trained["m.lora_B.weight"]
        padded.append(full)
    out = DimensionWiseDelta().aggregate(previous, updates)
    fedavg = weighted_average(padded, torch.tensor(counts, dtype=torch.float64))
    for key in previous:
        torch.testing.assert_close(out[key], fedavg[key])


def test_the_stream_equals_the_closed_form_in_any_split():
    g = torch.Generator().manual_seed(2)
    previous = lora_pair("m", 8, 6, 5, g)
    ranks, counts = [8, 2, 4, 2, 8], [40, 25, 35, 10, 5]
    updates = [
        ClientUpdate(k, r, n, {key: torch.randn(v.shape, generator=g) for key, v in truncate(previous, r).items()}, {})
        for k, (r, n) in enumerate(zip(ranks, counts, strict=True))
    ]
    closed = dimension_wise_delta_average(
        previous, [u.lora for u in updates], ranks, torch.tensor(counts, dtype=torch.float64)
    )
    aggregator = DimensionWiseDelta()
    streamed = aggregator.aggregate(previous, reversed(updates))
    left, right = aggregator.begin(previous), aggregator.begin(previous)
    for u in updates[:2]:
        left.add(u)
    for u in updates[2:]:
        right.add(u)
    assert left.total == 65.0 and right.total == 50.0
    merged = aggregator.finish(left.merge(right))
    for key in previous:
        torch.testing.assert_close(streamed[key], closed[key])
        torch.testing.assert_close(merged[key], closed[key])
    nothing = aggregator.finish(aggregator.begin(previous))
    for key in previous:
        assert torch.equal(nothing[key], previous[key])  # no update: the previous adapter
