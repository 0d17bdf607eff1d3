"""The privacy layer attacked, not only its formulas: regenerate the noise, move the sum with one client,
read what a DP run reports, give it bad options, resume it under other settings, overflow the secure sum,
unmask a lone survivor. Each test is written from the definition of the guarantee (issue 21)."""

import json
import math

import pytest
import torch

from fedilora.aggregation import ClientUpdate, DimensionWise
from fedilora.coverage import DimensionWiseDelta
from fedilora.errors import ConfigError, RunFailed
from fedilora.model import LoRACLIPClassifier
from fedilora.privacy import DifferentialPrivacy, SecureAggregation
from fedilora.privacy.dp import secure_normal
from fedilora.privacy.secagg import FRACTION_BITS, SumOverflow, encode
from fedilora.server import NOISE_STREAM, FederatedServer, check_update, client_seed
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

R, D_IN, D_OUT, HEAD = 4, 400, 3, 600


def _global(seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = {"m.lora_A.weight": torch.randn(R, D_IN, generator=g), "m.lora_B.weight": torch.randn(D_OUT, R, generator=g)}
    return lora, {"head.weight": torch.randn(HEAD, generator=g)}


def _server(privacy, ranks, aggregator=None, secure=None, seed=0):
    lora, extra = _global()
    aggregator = (aggregator or DimensionWise()).setup(scale=1.0)
    privacy.setup(type(aggregator).__name__, num_clients=len(ranks), per_round=len(ranks), rounds=1000)
    # update_norm_factor as the trainer's default: under DP it must not run
    return FederatedServer(aggregator, list(ranks), len(ranks), R, seed, lora, extra, update_norm_factor=10.0,
                           privacy=privacy, secure_aggregation=secure)  # fmt: skip


def _update(server, client, rank, lora_delta=None, head_delta=None):
    """A checked update of ``client`` that moved from its payload by the given deltas (zero if None)."""
    lora, extra = server.payload(client, rank)
    new_lora = {k: v + (lora_delta[k] if lora_delta else 0) for k, v in lora.items()}
    new_extra = {k: v + (head_delta if head_delta is not None else 0) for k, v in extra.items()}
    update = ClientUpdate(client_id=client, rank=rank, num_samples=10, lora=new_lora, extra=new_extra)
    assert check_update(update, lora, extra) is None
    return update


def _head_update(server, client, norm, generator):
    direction = torch.randn(HEAD, generator=generator)
    return _update(server, client, R, head_delta=direction / direction.norm() * norm)


def _flat(state):
    return torch.cat([v.double().reshape(-1) for v in state.values()])


# ------------------------------------------------------------------------------- 1. regenerate the noise
def _attack(server, before_lora, before_extra):
    """The attacker's estimate of the lone client's clipped update: the release minus the noise rebuilt
    from the run's seed and round, drawn in the release's order (LoRA sums, then head sums)."""
    std = server.privacy.sum_multiplier * server.privacy.clip_norm
    generator = torch.Generator().manual_seed(client_seed(server.seed, 0, NOISE_STREAM))
    rebuilt = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * std
               for k, v in {**before_lora, **before_extra}.items()}  # fmt: skip
    after = {**server.global_lora, **server.global_extra}
    return {k: after[k].double() - v.double() - rebuilt[k] for k, v in {**before_lora, **before_extra}.items()}


@pytest.mark.parametrize("reproducible", [False, True])
def test_the_noise_cannot_be_rebuilt_from_the_config(reproducible):
    privacy = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=4.0, reproducible_noise=reproducible)
    server = _server(privacy, ranks=[R])
    before_lora, before_extra = dict(server.global_lora), dict(server.global_extra)
    update = _head_update(server, 0, 0.5, torch.Generator().manual_seed(3))
    truth = update.extra["head.weight"].double() - before_extra["head.weight"].double()
    server.aggregate(0, [update])
    recovered = _attack(server, before_lora, before_extra)["head.weight"]
    error = float((recovered - truth).abs().max())
    if reproducible:  # the defect this option keeps for tests: the update comes back (float32 rounding only)
        assert error < 1e-4
    else:  # what is left is the real noise minus the rebuilt one: two independent N(0, (sigma C)^2)
        assert error > 1.0
        assert float((recovered - truth).std()) == pytest.approx(4.0 * math.sqrt(2), rel=0.15)


def test_two_releases_of_one_config_differ_and_seeded_ones_do_not():
    def release(**options):
        server = _server(DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.0, **options), ranks=[R, 2])
        g = torch.Generator().manual_seed(5)
        server.aggregate(0, [_head_update(server, 0, 0.3, g), _head_update(server, 1, 0.3, g)])
        return _flat({**server.global_lora, **server.global_extra})

    assert not torch.equal(release(), release())
    assert torch.equal(release(reproducible_noise=True), release(reproducible_noise=True))


def test_secure_noise_is_shared_by_a_runs_processes_and_its_key_is_never_saved(tmp_path):
    from fedilora.privacy.dp import SecureNoise

    key = bytes(range(32))
    # every process of a run draws the same noise from rank 0's key; another key or round, other noise
    assert torch.equal(secure_normal((1000,), SecureNoise(key, 3)), secure_normal((1000,), SecureNoise(key, 3)))
    assert not torch.equal(secure_normal((1000,), SecureNoise(key, 3)), secure_normal((1000,), SecureNoise(key, 4)))
    other = bytes(range(1, 33))
    assert not torch.equal(secure_normal((1000,), SecureNoise(key, 3)), secure_normal((1000,), SecureNoise(other, 3)))
    # a run writes its key nowhere: not in its checkpoints, results, config or logs
    privacy = DifferentialPrivacy(clip_norm=0.5, noise_multiplier=1.0)
    trainer = FederatedTrainer(rounds=1, clients_per_round=2, ranks=2, max_local_steps=1, progress=False,
                               privacy=privacy, root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2, num_train=40, num_test=24))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files)
    assert not any(privacy.noise_key in p.read_bytes() for p in files)


def test_secure_noise_is_standard_normal():
    z = secure_normal((200_001,))
    assert z.dtype == torch.float64 and z.shape == (200_001,) and torch.isfinite(z).all()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert float(z.std()) == pytest.approx(1.0, abs=4 * math.sqrt(0.5 / n))
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5, 3.0):  # the empirical CDF at a few points, within 4 standard errors
        p = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        assert float((z <= x).double().mean()) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-9)
    assert not torch.equal(secure_normal((8,)), secure_normal((8,)))


# ---------------------------------------------------------------------- 2. one client moves the sum by <= C
@pytest.mark.parametrize("aggregator", [DimensionWise, DimensionWiseDelta])
def test_adding_one_client_moves_the_released_sum_by_at_most_c(aggregator):
    # the case: norms 0.1 x3 and 2 x3 keep everyone; one more of 0.1 made the median rule reject
    # the three norm-2 clients (the sum moved by 2.9 C). Under DP the rule is off and K comes from the plan.
    clip = 1.0
    sums = []
    for norms in ([0.1, 0.1, 0.1, 2, 2, 2], [0.1, 0.1, 0.1, 2, 2, 2, 0.1]):
        privacy = DifferentialPrivacy(clip_norm=clip, noise_multiplier=1e-12)
        server = _server(privacy, ranks=[R] * len(norms), aggregator=aggregator())
        before = _flat(server.global_extra)
        g = torch.Generator().manual_seed(11)
        result = server.aggregate(0, [_head_update(server, k, n, g) for k, n in enumerate(norms)])
        assert not result.rejected and not result.skipped
        sums.append((_flat(server.global_extra) - before) * len(norms))  # the step times K: the noised sum
    assert float((sums[1] - sums[0]).norm()) <= clip * (1 + 1e-5)


def test_a_failed_client_counts_as_a_zero_update_in_public_divisors():
    privacy = DifferentialPrivacy(clip_norm=10.0, noise_multiplier=1e-12)
    server = _server(privacy, ranks=[R, R, R], aggregator=DimensionWiseDelta())
    before = _flat(server.global_extra)
    head = torch.full((HEAD,), 0.01)
    # client 2 fails (its update never arrives): the divisor stays the plan's 3, not the 2 that arrived
    server.aggregate(0, [_update(server, 0, R, head_delta=head), _update(server, 1, R, head_delta=head)],
                     [(2, "RuntimeError: boom")])  # fmt: skip
    step = _flat(server.global_extra) - before
    assert torch.allclose(step, torch.full_like(step, 2 * 0.01 / 3), atol=1e-6)


def test_a_dp_round_with_no_update_releases_the_noise_and_is_not_skipped():
    server = _server(DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.0), ranks=[R, R])
    before = _flat(server.global_extra)
    result = server.aggregate(0, [], [(0, "x"), (1, "y")])
    assert not result.skipped
    assert float((_flat(server.global_extra) - before).std()) == pytest.approx(1.0 / 2, rel=0.15)  # sigma C / K


# ------------------------------------------------------------------ 3. the noise where the formulas say
def test_noise_std_under_adaptive_clipping_is_sigma_delta_c_on_lora_and_head():
    # sigma_delta < sigma: the count query spends part of the budget (Andrew et al. 2021, Theorem 1)
    privacy = DifferentialPrivacy(clip_norm=0.5, noise_multiplier=2.0, adaptive_clipping=True,
                                  count_noise_multiplier=3.0)  # fmt: skip
    server = _server(privacy, ranks=[R, R, 2], aggregator=DimensionWiseDelta())
    sigma_delta = (2.0**-2 - (2 * 3.0) ** -2) ** -0.5
    assert privacy.sum_multiplier == pytest.approx(sigma_delta)
    before_lora, before_extra = dict(server.global_lora), dict(server.global_extra)
    # no change: whatever moves the global is the noise; the clip norm is read before it adapts
    clip = privacy.clip_norm
    server.aggregate(0, [_update(server, k, r) for k, r in enumerate([R, R, 2])])
    expected = sigma_delta * clip / 3  # DimensionWiseDelta: the noised sum over the round's K = 3
    head = (server.global_extra["head.weight"] - before_extra["head.weight"]).double()
    assert float(head.std()) == pytest.approx(expected, rel=0.1)  # 600 coordinates: ~3% standard error
    a = (server.global_lora["m.lora_A.weight"] - before_lora["m.lora_A.weight"]).double()
    for row in a:  # every rank dimension, the ones only two clients cover included
        assert float(row.std()) == pytest.approx(expected, rel=0.15)
    assert privacy.clip_norm != clip  # it adapted (from a noised count)


# ---------------------------------------------------------------- 4. bad options: one line, the key named
@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": math.nan, "noise_multiplier": 1.0}, "clip_norm"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"noise_multiplier": 1e-300}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "clip_learning_rate": math.nan, "adaptive_clipping": True}, "clip_learning_rate"),
        ({"noise_multiplier": 1.0, "clip_learning_rate": -5.0, "adaptive_clipping": True}, "clip_learning_rate"),
        ({"noise_multiplier": 1.0, "count_noise_multiplier": math.inf, "adaptive_clipping": True},
         "count_noise_multiplier"),
        ({"noise_multiplier": 1.0, "delta": math.nan}, "delta"),
        ({"noise_multiplier": 1.0, "target_quantile": math.nan}, "target_quantile"),
    ],
)
def test_every_bad_privacy_option_is_refused_naming_its_key(options, key):
    with pytest.raises(ConfigError, match=rf"^trainer\.privacy\.{key}: must be a finite number") as err:
        DifferentialPrivacy(**options)
    assert "\n" not in str(err.value)


def test_a_bad_privacy_option_on_the_command_line_exits_2_with_one_line(capsys):
    from fedilora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--trainer.privacy=fedilora.privacy.DifferentialPrivacy",
              "--trainer.privacy.init_args.clip_norm=.inf", "--trainer.privacy.init_args.noise_multiplier=1.0"])
    assert exit_info.value.code == 2
    assert "trainer.privacy.clip_norm: must be a finite number > 0, got inf" in capsys.readouterr().err


def test_a_release_that_overflows_float32_fails_before_any_checkpoint(tmp_path):
    # a finite clip norm so large that the noised model is inf in float32: refused, nothing written
    trainer = FederatedTrainer(rounds=1, clients_per_round=2, ranks=2, max_local_steps=1, progress=False,
                               privacy=DifferentialPrivacy(clip_norm=1e300, noise_multiplier=1.0),
                               root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(RunFailed, match="non-finite values; nothing was saved"):
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2, num_train=40, num_test=24))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("results.json"))


# ----------------------------------------------------------- 5. a run's reports, resume and its settings
def _fit(root, rounds=2, ckpt_path=None, privacy=None, **trainer):
    torch.manual_seed(0)
    trainer = FederatedTrainer(rounds=rounds, clients_per_round=2, ranks=[4, 2, 2, 2], max_local_steps=2,
                               privacy=privacy, root_dir=str(root), progress=False, checkpoint_every=1,
                               **trainer)  # fmt: skip
    results = trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=4, num_train=160),
                          ckpt_path=ckpt_path)  # fmt: skip
    return trainer, results


def _dp(**options):
    return DifferentialPrivacy(**{"clip_norm": 0.5, "noise_multiplier": 1.2, **options})


def test_a_dp_run_reports_only_released_figures_and_two_runs_differ(tmp_path, capsys):
    one, results = _fit(tmp_path / "a", privacy=_dp())
    out = capsys.readouterr().out
    for h in one.history:
        assert all(k == "round" or k.startswith(("global/", "privacy/", "comm/bytes_downloaded", "round/time_s",
                                                 "round/skipped")) for k in h), h.keys()  # fmt: skip
        assert "privacy/not_private" not in h
    assert not results["personalized"] and "edits" not in results
    assert results["privacy"]["private"] is True and results["privacy"]["noise"].startswith("secure")
    assert "NOT PRIVATE" not in out and "differential privacy: epsilon" in out
    assert "trainer.update_norm_factor is off under trainer.privacy" in out
    on_disk = json.loads((one.log_dir / "results.json").read_text())
    assert on_disk["privacy"]["private"] is True
    two, _ = _fit(tmp_path / "b", privacy=_dp())
    assert any(not torch.equal(one.global_lora[k], two.global_lora[k]) for k in one.global_lora)


def test_per_client_figures_are_opt_in_and_say_epsilon_does_not_cover_them(tmp_path, capsys):
    trainer, results = _fit(tmp_path, privacy=_dp(log_client_metrics=True))
    assert "epsilon does not cover them" in capsys.readouterr().out
    assert any(k.startswith("client/") for k in trainer.history[0])
    assert results["personalized"]


def test_resume_keeps_the_privacy_settings_and_the_multiplier_that_ran(tmp_path):
    budget = {"target_epsilon": 8.0, "noise_multiplier": None}
    first, _ = _fit(tmp_path, rounds=3, privacy=_dp(**budget))
    sigma = first.privacy.sigma  # derived for 3 rounds
    after_two = str(first.log_dir / "checkpoints" / "round-0002.ckpt")
    with pytest.raises(ConfigError, match=r"ran with trainer\.privacy and this config has none"):
        _fit(tmp_path, rounds=3, ckpt_path=after_two, privacy=None)
    with pytest.raises(ConfigError, match=r"trainer\.privacy\.init_args\.clip_norm: checkpoint 0\.5, config 0\.25"):
        _fit(tmp_path, rounds=3, ckpt_path=after_two, privacy=_dp(**budget, clip_norm=0.25))
    # 4 rounds would derive a larger sigma; round 3 runs with the sigma rounds 1-2 ran with, and then the
    # budget (spent by 3 rounds of it) stops the run before round 4
    _, again = _fit(tmp_path, rounds=4, ckpt_path=after_two, privacy=_dp(**budget))
    assert _dp(**budget).setup("DimensionWise", 4, 2, 4).sigma > sigma
    assert again["privacy"]["noise_multiplier"] == sigma
    assert again["privacy"]["rounds"] == 3
    from fedilora.privacy.accounting import PrivacyAccountant

    accountant = PrivacyAccountant(sample_rate=0.5, delta=1e-5)
    for _ in range(3):
        accountant.step(sigma)
    assert again["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(), rel=1e-12)


# ------------------------------------------------------------------------------ 6. the secure sum's limits
def test_a_sum_that_could_wrap_is_refused_before_encoding():
    # the cases: two clients of 1e11 at 24 fraction bits decoded to -7.49e10
    with pytest.raises(SumOverflow, match=r"lower trainer\.secure_aggregation\.fraction_bits"):
        encode(torch.tensor([1e11], dtype=torch.float64), FRACTION_BITS, participants=2)
    # 4 clients x 600,000 samples at 40 fraction bits (sample-weighted sums without DP)
    with pytest.raises(SumOverflow):
        encode(torch.tensor([600_000.0 * 1.5], dtype=torch.float64), 40, participants=4)
    encode(torch.tensor([600_000.0 * 1.5], dtype=torch.float64), 24, participants=4)  # fits at 24 bits
    with pytest.raises(SumOverflow):
        encode(torch.tensor([math.nan]), FRACTION_BITS)


def test_a_lone_survivor_is_not_unmasked():
    secure = SecureAggregation()
    contributions = {c: {"x": torch.full((5,), float(c + 1))} for c in range(3)}
    total, cost = secure.sum(contributions, b"round-0", dropped=[0, 1])
    assert total is None and cost["secagg/passes"] == 1.0
    with pytest.raises(ConfigError, match=r"min_survivors: must be an integer >= 2"):
        SecureAggregation(min_survivors=1)
    with pytest.raises(ConfigError, match=r"fewer than trainer\.secure_aggregation\.min_survivors=3"):
        SecureAggregation(min_survivors=3).setup("DimensionWise", per_round=2)


def test_a_round_with_one_update_under_secure_aggregation_is_skipped_with_the_reason():
    privacy = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.0)
    server = _server(privacy, ranks=[R, R], secure=SecureAggregation())
    before = _flat(server.global_extra)
    result = server.aggregate(0, [_update(server, 0, R)], [(1, "lost")])
    assert result.skipped and torch.equal(_flat(server.global_extra), before)
    assert result.warnings(1) == [
        "warning: round 0 skipped: fewer than trainer.secure_aggregation.min_survivors=2 clients left to unmask; "
        "the global model is unchanged"
    ]


# ---------------------------------------------------------------------------- 7. the empirical audit
def test_the_audit_finds_no_more_than_the_accountant_and_finds_the_reproducible_leak(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import privacy_audit
    from fedilora.privacy.accounting import PrivacyAccountant

    accountant = PrivacyAccountant(sample_rate=1.0, delta=1e-5)
    accountant.step(2.0)
    claimed = accountant.epsilon()  # 2.17 for one round at sigma 2
    secure = privacy_audit.one_run(200, 5_000, 2.0, 60, reproducible=False, seed=0)
    leaked = privacy_audit.one_run(200, 5_000, 2.0, 60, reproducible=True, seed=0)
    assert secure["epsilon"] <= claimed
    assert leaked["correct"] == leaked["guesses"] == 60 and leaked["epsilon"] > claimed
    # the bound itself, by hand: 60 of 60 right rejects eps while p(eps)^60 < 0.05
    assert privacy_audit.audited_epsilon(60, 60) == pytest.approx(math.log(0.05 ** (-1 / 60) - 1) * -1, rel=1e-6)
