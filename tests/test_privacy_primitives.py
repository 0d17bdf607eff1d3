"""The privacy building blocks on their defining properties: masks cancel, clipping bounds, the
accountant matches the Gaussian mechanism's closed form."""

import math

import numpy as np
import pytest
import torch

from fedilora.privacy import dp, secagg
from fedilora.privacy.accounting import PrivacyAccountant, noise_multiplier_for


def _contributions(ranks, global_rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        a = torch.randn(r, 6, generator=g)
        b = torch.randn(5, r, generator=g)
        padded = dp.pad_to_rank({"m.lora_A.weight": a, "m.lora_B.weight": b}, global_rank)
        padded["weights"] = dp.coverage([r], global_rank) * 3.0
        out.append(padded)
    return out


def _masked(contributions, context=b"round-0"):
    keys = {i: secagg.MaskingKey() for i in range(len(contributions))}
    publics = {i: k.public for i, k in keys.items()}
    return [secagg.mask(c, i, keys[i], publics, context) for i, c in enumerate(contributions)], keys


def test_masked_sum_equals_plain_sum_up_to_fixed_point_resolution():
    contributions = _contributions([8, 4, 2, 2])
    masked, _ = _masked(contributions)
    _, layout = secagg.flatten(contributions[0])
    total = secagg.unmask_sum(masked, layout)
    for key in contributions[0]:
        plain = sum(c[key].double() for c in contributions)
        assert torch.allclose(total[key], plain, atol=len(contributions) * 2.0**-secagg.FRACTION_BITS)
    # the per-dimension weights are integers times 3: exact
    assert torch.equal(total["weights"], torch.tensor([12.0, 12, 6, 6, 3, 3, 3, 3], dtype=torch.float64))


def test_a_masked_update_does_not_correlate_with_its_plaintext():
    big = {"x": torch.randn(20_000, generator=torch.Generator().manual_seed(1))}
    masked, _ = _masked([big, {"x": torch.zeros(20_000)}])
    seen = secagg.decode(masked[0]).numpy()
    r = np.corrcoef(seen, big["x"].double().numpy())[0, 1]
    assert abs(r) < 0.05  # 5 standard errors of a zero correlation at n = 20000


def test_masks_do_not_cancel_without_a_dropped_client_and_do_after_remasking():
    contributions = _contributions([8, 4, 2])
    masked, keys = _masked(contributions)
    _, layout = secagg.flatten(contributions[0])
    survivors = secagg.unmask_sum(masked[:2], layout)
    plain = sum(c["m.lora_A.weight"].double() for c in contributions[:2])
    assert (survivors["m.lora_A.weight"] - plain).abs().max() > 1.0  # pair masks with client 2 remain
    publics = {i: keys[i].public for i in (0, 1)}
    again = [secagg.mask(contributions[i], i, keys[i], publics, b"round-0/redo") for i in (0, 1)]
    redone = secagg.unmask_sum(again, layout)
    assert torch.allclose(redone["m.lora_A.weight"], plain, atol=2 * 2.0**-secagg.FRACTION_BITS)


def test_encoding_refuses_values_beyond_its_range():
    with pytest.raises(secagg.SumOverflow, match="can leave the fixed-point range"):
        secagg.encode(torch.tensor([2.0 ** (secagg.MODULUS_BITS - secagg.FRACTION_BITS)]))
    # the bound is the sum's: a value that fits alone is refused when 4 clients could add up past 2^61
    edge = torch.tensor([2.0 ** (secagg.MODULUS_BITS - 1 - secagg.FRACTION_BITS) / 3])
    secagg.encode(edge, participants=2)
    with pytest.raises(secagg.SumOverflow, match="summed over 4 clients"):
        secagg.encode(edge, participants=4)
    x = torch.tensor([-3.25, 0.0, 1e6])
    assert torch.equal(secagg.decode(secagg.encode(x)), x.double())


def test_clipping_bounds_every_update_and_keeps_small_ones():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        states = [{"a": torch.randn(4, 5, generator=g) * scale}, {"h": torch.randn(3, generator=g) * scale}]
        clipped, norm = dp.clip(states, clip_norm=1.0)
        assert dp.l2_norm(clipped) <= 1.0 + 1e-6
        assert norm == pytest.approx(dp.l2_norm(states))
        if norm <= 1.0:
            assert all(torch.equal(c["a" if "a" in c else "h"], s["a" if "a" in s else "h"]) for c, s in
                       zip(clipped, states, strict=True))  # fmt: skip


def test_coverage_and_average_noise_std_follow_the_ranks():
    counts = dp.coverage([8, 8, 4, 2], global_rank=8)
    assert counts.tolist() == [4, 4, 3, 3, 2, 2, 2, 2]
    std = dp.average_noise_std(counts, noise_multiplier=2.0, clip_norm=0.5)
    assert std.tolist() == pytest.approx([0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5, 0.5, 0.5])


def test_epsilon_without_subsampling_matches_the_gaussian_mechanism_closed_form():
    # q = 1: T rounds of the Gaussian mechanism have RDP T * alpha / (2 sigma^2); opacus converts RDP to
    # (eps, delta) with eps = rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha).
    sigma, rounds, delta = 4.0, 10, 1e-5
    accountant = PrivacyAccountant(sample_rate=1.0, delta=delta)
    for _ in range(rounds):
        accountant.step(sigma)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    expected = min(
        rounds * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders
    )
    assert accountant.epsilon() == pytest.approx(expected, rel=1e-9)
    assert accountant.rounds == rounds


def test_accountant_state_round_trips_and_target_epsilon_is_met():
    accountant = PrivacyAccountant(sample_rate=0.1, delta=1e-5)
    for _ in range(20):
        accountant.step(1.1)
    restored = PrivacyAccountant(sample_rate=0.1, delta=1e-5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon() > 0
    sigma = noise_multiplier_for(target_epsilon=4.0, delta=1e-5, sample_rate=0.1, rounds=50)
    fresh = PrivacyAccountant(sample_rate=0.1, delta=1e-5)
    assert fresh.epsilon_after(sigma, 50) <= 4.0
    assert fresh.epsilon_after(sigma * 0.95, 50) > 4.0  # the smallest such multiplier, up to opacus's tolerance


def test_adaptive_clipping_moves_towards_the_target_quantile():
    assert dp.adapted_clip_norm(1.0, unclipped_fraction=1.0, target_quantile=0.5, learning_rate=0.2) < 1.0
    assert dp.adapted_clip_norm(1.0, unclipped_fraction=0.0, target_quantile=0.5, learning_rate=0.2) > 1.0
    assert dp.adapted_clip_norm(1.0, 0.5, 0.5, 0.2) == 1.0
    assert dp.sum_noise_multiplier(1.0, 10.0) == pytest.approx((1 - 1 / 400) ** -0.5)
    with pytest.raises(ValueError, match="too small"):
        dp.sum_noise_multiplier(1.0, 0.4)
