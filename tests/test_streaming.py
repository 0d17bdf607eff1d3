"""Streaming aggregation (begin / add / merge / finish) for every aggregator, against the batch forms.

Tolerances: float64 tensors, so that the streaming and batch forms (which sum in different orders and
divide at different points) agree to 1e-12 absolute; orders of arrival and merges likewise; float32 to
torch's default float32 tolerance (rtol 1.3e-6, atol 1e-5).
"""

from __future__ import annotations

import random
import weakref

import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import reference_aggregation as ref
from fedilora.aggregation import (
    ClientUpdate,
    DimensionWise,
    FedAvg,
    WeightedSums,
    nbytes,
    rank_axis,
    sample_weights,
    truncate,
    weighted_average,
)
from fedilora.baselines import (
    Centralized,
    FactorStack,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    Local,
    hetlora_weights,
    lora_deltas,
    module_keys,
    stack_loras,
    truncated_factors,
)
from fedilora.errors import ConfigError

SHAPES = {"visual.m.c_fc": (5, 6), "n": (3, 4)}  # prefix -> (d_out, d_in); for "n" d_in equals the rank 4
RANKS = [4, 2, 1, 3, 4, 2]
COUNTS = [30, 10, 25, 7, 12, 40]
SCALE = 0.5
TIGHT = {"atol": 1e-12, "rtol": 1e-10}
AGGREGATORS = [DimensionWise, FedAvg, HetLoRA, FLoRA, FlexLoRA]


def make_lora(rank: int, seed: int, dtype: torch.dtype = torch.float64, shapes=SHAPES) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (d_out, d_in) in shapes.items():
        out[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g, dtype=dtype)
        out[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g, dtype=dtype)
    return out


def make_extra(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "head.weight": torch.randn(3, 5, generator=g, dtype=dtype),
        "head.bias": torch.randn(3, generator=g, dtype=dtype),
        "head.temperature": torch.randn((), generator=g, dtype=dtype),  # 0-dim tensors average too
    }


def make_updates(ranks=RANKS, counts=COUNTS, dtype=torch.float64, seed=0) -> list[ClientUpdate]:
    return [
        ClientUpdate(k, r, n, make_lora(r, seed + k, dtype), make_extra(seed + k, dtype))
        for k, (r, n) in enumerate(zip(ranks, counts, strict=True))
    ]


def ranks_for(aggregator: type) -> list[int]:
    return [4] * len(RANKS) if aggregator is FedAvg else RANKS


def outcome(aggregator, result: dict[str, Tensor]) -> dict[str, Tensor]:
    """What must agree between two runs: FlexLoRA's factors are defined up to signs, their products are not."""
    if isinstance(aggregator, FlexLoRA):
        return {p: result[b] @ result[a] for p, (a, b) in module_keys(result).items()}
    if isinstance(aggregator, FLoRA):
        return {**result, **{f"delta/{p}": d for p, d in aggregator.last_delta.items()}}
    return result


def batch_reference(aggregator, previous, updates) -> dict[str, Tensor]:
    """The same round through the batch implementations (stacked, renormalised weights)."""
    loras, p = [u.lora for u in updates], sample_weights(updates)
    if isinstance(aggregator, (DimensionWise, FedAvg)):
        return ref.dimension_wise_average(previous, loras, [u.rank for u in updates], p)
    if isinstance(aggregator, HetLoRA):
        return ref.zero_padded_average(previous, loras, hetlora_weights(loras))
    if isinstance(aggregator, FLoRA):
        reinit = {k: torch.zeros_like(v) if rank_axis(k) == 1 else v for k, v in previous.items()}
        deltas = lora_deltas(stack_loras(loras, p), aggregator.scale)
        return {**reinit, **{f"delta/{k}": v for k, v in deltas.items()}}
    if isinstance(aggregator, FlexLoRA):
        out = {}
        for prefix, (u, s, v) in ref.flexlora_svd(loras, p, aggregator.scale).items():
            b, a = truncated_factors(u, s, v, 4, aggregator.scale)
            out[prefix] = b @ a
        return out
    raise AssertionError(aggregator)


def stream(aggregator, previous, updates, previous_extra=None):
    acc = aggregator.begin(previous, previous_extra)
    for update in updates:
        acc.add(update)
    return acc


def assert_same(got: dict[str, Tensor], expected: dict[str, Tensor], **tol) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_streaming_equals_the_batch_implementation(aggregator) -> None:
    agg = aggregator().setup(SCALE)
    updates = make_updates(ranks_for(aggregator))
    previous = make_lora(4, 99)
    # a generator: the stream never needs the list
    got = agg.aggregate(previous, (u for u in updates))
    assert_same(outcome(agg, got), batch_reference(agg, previous, updates), **TIGHT)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_heads_are_the_sample_weighted_average(aggregator) -> None:
    updates = make_updates(ranks_for(aggregator))
    agg = aggregator().setup(SCALE)
    acc = stream(agg, make_lora(4, 99), updates, previous_extra=make_extra(99))
    heads = agg.finish_extra(acc)
    assert_same(heads, ref.weighted_average([u.extra for u in updates], sample_weights(updates)), **TIGHT)
    assert heads["head.temperature"].shape == ()
    # by hand for one entry: sum_k n_k x_k / sum_k n_k
    by_hand = sum(n * u.extra["head.bias"][0] for n, u in zip(COUNTS, updates, strict=True)) / sum(COUNTS)
    torch.testing.assert_close(heads["head.bias"][0], by_hand, **TIGHT)
    # and the trainer's function agrees
    assert_same(heads, weighted_average([u.extra for u in updates], sample_weights(updates)), **TIGHT)


def test_heads_need_the_global_heads_and_keep_them_without_updates() -> None:
    agg = DimensionWise()
    with pytest.raises(ValueError, match="begun without global_extra"):
        agg.finish_extra(stream(agg, make_lora(4, 1), make_updates()))
    previous_extra = make_extra(5)
    assert_same(agg.finish_extra(agg.begin(make_lora(4, 1), previous_extra)), previous_extra, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_order_of_arrival_does_not_matter(aggregator, dtype) -> None:
    updates = make_updates(ranks_for(aggregator), dtype=dtype)
    previous = make_lora(4, 99, dtype)
    first = aggregator().setup(SCALE)
    expected = outcome(first, first.aggregate(previous, updates))
    tol = TIGHT if dtype == torch.float64 else {}
    for seed in range(3):
        shuffled = updates[:]
        random.Random(seed).shuffle(shuffled)
        agg = aggregator().setup(SCALE)
        assert_same(outcome(agg, agg.aggregate(previous, shuffled)), expected, **tol)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_merge_of_partial_accumulators_equals_one_accumulator(aggregator) -> None:
    updates = make_updates(ranks_for(aggregator))
    previous, previous_extra = make_lora(4, 99), make_extra(99)
    one = aggregator().setup(SCALE)
    acc = stream(one, previous, updates, previous_extra)
    expected, expected_heads = outcome(one, one.finish(acc)), one.finish_extra(acc)
    # a tree: ((0, 1) + (2)) + (3, 4, 5), as two processes and a subtree would give
    agg = aggregator().setup(SCALE)
    left = stream(agg, previous, updates[:2], previous_extra).merge(stream(agg, previous, updates[2:3], previous_extra))
    merged = left.merge(stream(agg, previous, updates[3:], previous_extra))
    assert merged.count == len(updates) and merged.num_samples == sum(COUNTS)
    assert_same(outcome(agg, agg.finish(merged)), expected, **TIGHT)
    assert_same(agg.finish_extra(merged), expected_heads, **TIGHT)
    if isinstance(agg, FLoRA):
        assert agg.stacked_nbytes == one.stacked_nbytes == nbytes(stack_loras([u.lora for u in updates], torch.ones(6)))


def test_merge_refuses_other_kinds_and_consumed_accumulators() -> None:
    previous = make_lora(4, 99)
    with pytest.raises(TypeError, match="cannot merge a NormAccumulator into a DimensionAccumulator"):
        DimensionWise().begin(previous).merge(HetLoRA().begin(previous))
    with pytest.raises(ValueError, match="heads"):
        DimensionWise().begin(previous, make_extra(0)).merge(DimensionWise().begin(previous))
    agg = DimensionWise()
    acc = stream(agg, previous, make_updates())
    agg.finish(acc)
    for use in (lambda: acc.add(make_updates()[0]), lambda: agg.finish(acc), lambda: agg.begin(previous).merge(acc)):
        with pytest.raises(RuntimeError, match="finish consumes it"):
            use()
    # a merge consumes the merged accumulator: its sums now count in the other one
    part, whole = stream(agg, previous, make_updates()[:2]), agg.begin(previous)
    whole.merge(part)
    with pytest.raises(RuntimeError, match="begin a new one"):
        whole.merge(part)
    with pytest.raises(ValueError, match="into itself"):
        whole.merge(whole)


def test_weights_are_accumulated_sample_counts_per_dimension() -> None:
    # ranks 4, 2, 1 with n = 10, 20, 30 into a global rank 6: weight[i] = sum of n_k over r_k > i
    previous = make_lora(6, 99)
    acc = stream(DimensionWise(), previous, make_updates([4, 2, 1], [10, 20, 30]))
    assert torch.equal(acc.lora.weight, torch.tensor([60.0, 30.0, 10.0, 10.0, 0.0, 0.0], dtype=torch.float64))
    # HetLoRA counts every update on every dimension (zero padding)
    het = stream(HetLoRA(), previous, make_updates([4, 2, 1], [10, 20, 30]))
    assert (het.lora.weight == het.lora.weight[0]).all() and het.lora.weight[0] > 0


def test_every_covered_dimension_has_total_weight_one() -> None:
    # every client uploads ones on its own dimensions: a weighted mean with weights summing to 1 is 1
    previous = make_lora(6, 99)
    updates = make_updates([4, 2, 1, 3], [10, 20, 30, 7])
    for u in updates:
        u.lora = {k: torch.ones_like(v) for k, v in u.lora.items()}
    got = DimensionWise().aggregate(previous, updates)
    for key, value in got.items():
        covered, kept = (value[:4], value[4:]) if rank_axis(key) == 0 else (value[:, :4], value[:, 4:])
        assert torch.equal(covered, torch.ones_like(covered))
        assert torch.equal(kept, previous[key][4:] if rank_axis(key) == 0 else previous[key][:, 4:])


@pytest.mark.parametrize("aggregator", [DimensionWise, FedAvg])
def test_equal_ranks_stream_is_fedavg(aggregator) -> None:
    updates = make_updates([4, 4, 4], [1, 2, 5])
    got = aggregator().aggregate(make_lora(4, 99), updates)
    for key in got:
        by_hand = (1 * updates[0].lora[key] + 2 * updates[1].lora[key] + 5 * updates[2].lora[key]) / 8
        torch.testing.assert_close(got[key], by_hand, **TIGHT)


def test_one_client_is_that_client_and_uncovered_dimensions_keep_previous_values() -> None:
    previous = make_lora(6, 99)
    (update,) = make_updates([3], [7])
    got = DimensionWise().aggregate(previous, [update])
    assert_same(truncate(got, 3), update.lora, **TIGHT)
    for key in previous:
        kept = (got[key][3:], previous[key][3:]) if rank_axis(key) == 0 else (got[key][:, 3:], previous[key][:, 3:])
        assert torch.equal(*kept)
    # Centralized's one pooled update comes back bit for bit
    pooled = ClientUpdate(-1, 6, 123, make_lora(6, 5, torch.float32), {})
    assert_same(Centralized().aggregate(make_lora(6, 99, torch.float32), [pooled]), pooled.lora, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one pooled model"):
        Centralized().aggregate(make_lora(6, 99, torch.float32), [pooled, pooled])


def test_no_update_keeps_the_previous_adapter() -> None:
    previous = make_lora(4, 99)
    for aggregator in (DimensionWise, FedAvg, HetLoRA, FlexLoRA, Local):
        assert_same(aggregator().aggregate(previous, []), previous, atol=0, rtol=0)
    assert_same(Local().aggregate(previous, make_updates()), previous, atol=0, rtol=0)


def test_fedavg_stream_refuses_mixed_ranks() -> None:
    previous = make_lora(4, 99)
    acc = FedAvg().begin(previous)
    acc.add(make_updates([4], [1])[0])
    with pytest.raises(ConfigError, match=r"FedAvg needs equal ranks, got \[2, 4\]"):
        acc.add(make_updates([2], [1])[0])
    other = stream(FedAvg(), previous, make_updates([2], [1]))
    with pytest.raises(ConfigError, match="FedAvg needs equal ranks"):
        FedAvg().begin(previous).merge(stream(FedAvg(), previous, make_updates([4], [1]))).merge(other)


def test_hetlora_stream_is_uniform_while_every_product_is_zero() -> None:
    previous = make_lora(4, 99)
    updates = make_updates([4, 2], [1, 100])
    for u in updates:  # B = 0: ||B A|| = 0 for everyone, so the weights are uniform, not by samples
        u.lora = {k: torch.zeros_like(v) if rank_axis(k) == 1 else v for k, v in u.lora.items()}
    got = HetLoRA().aggregate(previous, updates)
    a = "visual.m.c_fc.lora_A.weight"
    by_hand = updates[0].lora[a].clone()
    by_hand[:2] += updates[1].lora[a]
    torch.testing.assert_close(got[a], by_hand / 2, **TIGHT)
    # a later update with a non-zero product restarts the sums: the zero-product updates get weight 0
    (normal,) = make_updates([3], [5], seed=7)
    got = HetLoRA().aggregate(previous, [*updates, normal])
    expected = ref.zero_padded_average(previous, [normal.lora], torch.tensor([1.0]))
    assert_same(got, expected, **TIGHT)
    # and so does a merge of a uniform accumulator with a normal one, in either order
    for parts in ((updates, [normal]), ([normal], updates)):
        agg = HetLoRA()
        merged = stream(agg, previous, parts[0]).merge(stream(agg, previous, parts[1]))
        assert_same(agg.finish(merged), expected, **TIGHT)


def test_flora_stream_counts_the_stacked_adapter() -> None:
    updates = make_updates()
    agg = FLoRA().setup(SCALE)
    agg.aggregate(make_lora(4, 99), updates)
    assert agg.stacked_nbytes == nbytes(stack_loras([u.lora for u in updates], sample_weights(updates)))


def test_flexlora_factor_stack_stops_growing_and_stays_exact() -> None:
    shapes = {"m": (9, 7)}  # min(d_out, d_in) = 7: re-factorised once the stacked width reaches 14
    stack = FactorStack(module_keys(make_lora(1, 0, shapes=shapes)), scale=SCALE)
    loras, weights = [make_lora(4, k, shapes=shapes) for k in range(12)], [float(k + 1) for k in range(12)]
    widths = []
    for lora, w in zip(loras, weights, strict=True):
        stack.add(lora, w)
        widths.append(stack.width("m"))
    assert stack.compressions >= 2 and max(widths) < 14 and widths[-1] <= 7 + 4
    (u, s, v) = stack.svd(divisor=sum(weights))["m"]
    target = sum(
        w * SCALE * lo["m.lora_B.weight"] @ lo["m.lora_A.weight"] for w, lo in zip(weights, loras, strict=True)
    )
    torch.testing.assert_close((u * s) @ v.T, target / sum(weights), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("aggregator", [*AGGREGATORS, Centralized])
def test_no_update_is_kept_once_added(aggregator) -> None:
    agg = aggregator().setup(SCALE)
    acc = agg.begin(make_lora(4, 99), make_extra(99))
    (update,) = make_updates([4], [3])
    tensors = [weakref.ref(t) for t in (*update.lora.values(), *update.extra.values())]
    acc.add(update)
    del update
    assert all(r() is None for r in tensors), "the accumulator kept a reference to an update"


@pytest.mark.parametrize("aggregator", [DimensionWise, FedAvg, HetLoRA])
def test_accumulator_holds_one_sum_per_tensor_and_one_weight_vector(aggregator) -> None:
    previous, previous_extra = make_lora(4, 99), make_extra(99)
    sizes = []
    for k in (1, 40):
        updates = make_updates(ranks_for(aggregator)[:1] * k, [5] * k)
        acc = stream(aggregator(), previous, updates, previous_extra)
        assert {k: v.shape for k, v in acc.lora.sums.items()} == {k: v.shape for k, v in previous.items()}
        assert acc.lora.weight.shape == (4,) and acc.extra.weight.shape == (1,)
        sizes.append(acc.nbytes())
    assert sizes[0] == sizes[1] == nbytes(previous) + 4 * 8 + nbytes(previous_extra) + 8


def _bytes_allocated(fn) -> int:
    """Bytes torch's CPU allocator handed out while ``fn`` ran (allocations, frees not subtracted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def test_dimension_wise_stream_allocates_nothing_per_update() -> None:
    # float32, 256-wide modules: one padded copy of the adapter is 16 KiB, K of them 320 KiB
    shapes = {"m": (256, 256)}
    previous = make_lora(8, 99, torch.float32, shapes)
    updates = [
        ClientUpdate(k, r, 10 + k, make_lora(r, k, torch.float32, shapes), {}) for k, r in enumerate([8, 4, 2, 1] * 5)
    ]
    agg = DimensionWise()
    acc = agg.begin(previous)
    allocated = _bytes_allocated(lambda: [acc.add(u) for u in updates] and None)
    allocated += _bytes_allocated(lambda: agg.finish(acc))
    assert allocated < 1024, f"{allocated} bytes allocated for {len(updates)} updates"
    # the instrument sees allocations: the batch form stacks K padded copies
    padded = _bytes_allocated(lambda: ref.dimension_wise_average(previous, [u.lora for u in updates], [8, 4, 2, 1] * 5,
                                                                 sample_weights(updates)))  # fmt: skip
    assert padded >= len(updates) * nbytes(previous)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_a_malformed_update_is_refused_and_leaves_the_accumulator_as_it_was(aggregator) -> None:
    updates = make_updates(ranks_for(aggregator))
    previous = make_lora(4, 99)
    agg = aggregator().setup(SCALE)
    acc = agg.begin(previous, make_extra(99))
    acc.add(updates[0])
    rank = updates[1].rank
    bad = [
        (ClientUpdate(7, rank, 5, make_lora(rank, 3), {"head.weight": torch.zeros(3, 5)}), r"client 7: .*missing"),
        (ClientUpdate(7, rank, 5, {**make_lora(rank, 3), "n.lora_A.weight": torch.zeros(rank, 5)}, make_extra(3)),
         r"client 7: n.lora_A.weight has shape \(\d, 5\), expected \(\d, 4\)"),
        (ClientUpdate(7, rank, 5, {**make_lora(rank, 3), "n.lora_B.weight": torch.zeros(3, 5)}, make_extra(3)),
         "client 7: n.lora_B.weight has 5 rank dimensions"),
        (ClientUpdate(7, 5, 5, make_lora(5, 3), make_extra(3)), r"client 7: rank 5 is outside 1..4"),
        (ClientUpdate(7, rank, 0, make_lora(rank, 3), make_extra(3)), "client 7: the number of samples"),
    ]  # fmt: skip
    for update, message in bad:
        if aggregator is FedAvg and update.rank != 4:
            continue  # FedAvg refuses the rank first (tested above)
        with pytest.raises(ValueError, match=message):
            acc.add(update)
    for update in updates[1:]:
        acc.add(update)
    assert_same(outcome(agg, agg.finish(acc)), batch_reference(agg, previous, updates), **TIGHT)


def test_weighted_sums_refuse_bad_weights() -> None:
    sums = WeightedSums.zeros(make_lora(4, 0))
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            sums.add(make_lora(2, 1), weight, covers=2, source="client 3")


def test_half_precision_updates_are_summed_in_float32() -> None:
    # 300 bfloat16 ones: a bfloat16 running sum stalls at 256 (8 significant bits), a float32 one does not
    key = "m.lora_A.weight"
    sums = WeightedSums.zeros({key: torch.zeros(2, 3, dtype=torch.bfloat16)})
    for _ in range(300):
        sums.add({key: torch.ones(2, 3, dtype=torch.bfloat16)}, 1.0, covers=2)
    assert sums.sums[key].dtype == torch.float32
    averaged = sums.average({key: torch.zeros(2, 3, dtype=torch.bfloat16)})[key]
    assert averaged.dtype == torch.bfloat16 and torch.equal(averaged, torch.ones(2, 3, dtype=torch.bfloat16))
