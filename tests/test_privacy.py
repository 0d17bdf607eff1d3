"""Differential privacy and secure aggregation through the server's round step and a real run: exact
against hand-computed values without noise, noise std per rank dimension as the formula says, masked
sums equal plain ones, epsilon as the accountant says and exact across a resume."""

import json

import pytest
import torch

from fedilora.aggregation import ClientUpdate, DimensionWise, FedAvg
from fedilora.baselines import FLoRA, HetLoRA
from fedilora.coverage import DimensionWiseDelta
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.privacy import DifferentialPrivacy, SecureAggregation
from fedilora.privacy.accounting import PrivacyAccountant
from fedilora.server import FederatedServer
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

R, D_IN, D_OUT = 4, 3, 2


def _global():
    g = torch.Generator().manual_seed(0)
    lora = {"m.lora_A.weight": torch.randn(R, D_IN, generator=g), "m.lora_B.weight": torch.randn(D_OUT, R, generator=g)}
    return lora, {"head.weight": torch.randn(2, generator=g)}


def _updates(lora, extra, ranks=(4, 2, 2), samples=(10, 30, 60)):
    g = torch.Generator().manual_seed(1)
    out = []
    for k, (rank, n) in enumerate(zip(ranks, samples, strict=True)):
        trained = {
            "m.lora_A.weight": lora["m.lora_A.weight"][:rank] + 0.1 * torch.randn(rank, D_IN, generator=g),
            "m.lora_B.weight": lora["m.lora_B.weight"][:, :rank] + 0.1 * torch.randn(D_OUT, rank, generator=g),
        }
        head = {"head.weight": extra["head.weight"] + 0.1 * torch.randn(2, generator=g)}
        update = ClientUpdate(client_id=k, rank=rank, num_samples=n, lora=trained, extra=head)
        update.metrics["update_norm"] = 0.0  # what FederatedServer.check sets; the norm rules are off here
        out.append(update)
    return out


def _server(aggregator=None, privacy=None, secure=None, ranks=(4, 2, 2), seed=0):
    lora, extra = _global()
    aggregator = (aggregator or DimensionWise()).setup(scale=1.0)
    if privacy is not None:
        privacy.setup(type(aggregator).__name__, num_clients=len(ranks), per_round=len(ranks), rounds=100)
    return FederatedServer(aggregator, list(ranks), len(ranks), R, seed, lora, extra, update_norm_factor=None,
                           privacy=privacy, secure_aggregation=secure)  # fmt: skip


@pytest.mark.parametrize(
    ("aggregator", "only_client_0"),
    # rows/columns 2-3 only client 0 has: DimensionWise averages them over it alone; DimensionWiseDelta
    # counts the other two clients as zero deltas there, so over all 3
    [(DimensionWise, 1), (DimensionWiseDelta, 3)],
)
def test_without_noise_dp_is_the_unweighted_mean_of_clipped_deltas(aggregator, only_client_0):
    server = _server(aggregator(), privacy=DifferentialPrivacy(clip_norm=100.0, noise_multiplier=1e-12))
    before_lora, before_extra = dict(server.global_lora), dict(server.global_extra)
    updates = _updates(before_lora, before_extra)
    server.aggregate(0, updates)
    # rows 0-1 of A (columns of B): the three clients, uniform weights (sample counts are private)
    a = [u.lora["m.lora_A.weight"] - before_lora["m.lora_A.weight"][: u.rank] for u in updates]
    expected = before_lora["m.lora_A.weight"].clone()
    expected[:2] += (a[0][:2] + a[1] + a[2]) / 3
    expected[2:] += a[0][2:] / only_client_0
    assert torch.allclose(server.global_lora["m.lora_A.weight"], expected, atol=1e-5)
    b = [u.lora["m.lora_B.weight"] - before_lora["m.lora_B.weight"][:, : u.rank] for u in updates]
    expected = before_lora["m.lora_B.weight"].clone()
    expected[:, :2] += (b[0][:, :2] + b[1] + b[2]) / 3
    expected[:, 2:] += b[0][:, 2:] / only_client_0
    assert torch.allclose(server.global_lora["m.lora_B.weight"], expected, atol=1e-5)
    head = sum(u.extra["head.weight"] - before_extra["head.weight"] for u in updates) / 3
    assert torch.allclose(server.global_extra["head.weight"], before_extra["head.weight"] + head, atol=1e-5)


def test_clipping_bounds_each_clients_influence():
    privacy = DifferentialPrivacy(clip_norm=0.01, noise_multiplier=1e-12)
    server = _server(privacy=privacy, ranks=(4,))
    before = {**server.global_lora, **server.global_extra}
    update = _updates(server.global_lora, server.global_extra, ranks=(4,), samples=(5,))[0]
    update.lora = {k: v * 50 for k, v in update.lora.items()}
    server.aggregate(0, [update])
    after = {**server.global_lora, **server.global_extra}
    moved = sum(float((after[k] - before[k]).double().square().sum()) for k in after) ** 0.5
    assert moved == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    ("aggregator", "divisors"),
    [(DimensionWise, [3, 3, 1, 1]), (DimensionWiseDelta, [3, 3, 3, 3])],  # n_i covering clients / all K
)
def test_noise_std_per_rank_dimension_is_sigma_c_over_the_divisor(aggregator, divisors):
    sigma, clip = 2.0, 0.5
    samples = []
    for round_ in range(300):
        server = _server(aggregator(), privacy=DifferentialPrivacy(clip_norm=clip, noise_multiplier=sigma))
        updates = _updates(server.global_lora, server.global_extra)
        for u in updates:  # no change: whatever moves the global is the noise
            u.lora = server.aggregator.broadcast(server.global_lora, u.rank)
            u.extra = dict(server.global_extra)
        before = server.global_lora["m.lora_A.weight"].clone()
        server.aggregate(round_, updates)
        samples.append(server.global_lora["m.lora_A.weight"] - before)
    std = torch.stack(samples).double().std(dim=0).mean(dim=1)  # per rank dimension
    expected = torch.tensor([sigma * clip / n for n in divisors], dtype=torch.float64)
    # 300 rounds x 3 columns: the std estimate is within ~5% (2 standard errors); 12% leaves a margin
    assert torch.allclose(std, expected, rtol=0.12), (std, expected)


@pytest.mark.parametrize("aggregator", [DimensionWise, DimensionWiseDelta, FedAvg])
def test_secure_aggregation_gives_the_plain_aggregate(aggregator):
    ranks = (4, 4, 4) if aggregator is FedAvg else (4, 2, 2)
    plain, masked = _server(aggregator(), ranks=ranks), _server(aggregator(), secure=SecureAggregation(), ranks=ranks)
    updates = _updates(plain.global_lora, plain.global_extra, ranks=ranks)
    plain.aggregate(0, updates)
    result = masked.aggregate(0, updates)
    assert not torch.equal(plain.global_lora["m.lora_A.weight"], _global()[0]["m.lora_A.weight"])
    for key in plain.global_lora:
        assert torch.allclose(masked.global_lora[key], plain.global_lora[key], atol=1e-6)
    assert torch.allclose(masked.global_extra["head.weight"], plain.global_extra["head.weight"], atol=1e-6)
    assert result.privacy["secagg/passes"] == 1.0
    numel = sum(v.numel() for v in {**plain.global_lora, **plain.global_extra}.values()) + R + 1 + 3
    assert result.privacy["secagg/bytes_uploaded"] == 3 * (32 + 8 * numel)


def test_a_client_dropped_after_masking_is_left_out_by_a_second_pass():
    secure = SecureAggregation()
    contributions = {c: {"x": torch.full((5,), float(c + 1))} for c in range(3)}
    total, cost = secure.sum(contributions, b"round-0", dropped=[1])
    assert torch.allclose(total["x"], torch.full((5,), 1.0 + 3.0, dtype=torch.float64))
    assert cost["secagg/passes"] == 2.0


def test_secure_aggregation_and_dp_together_match_dp_alone():
    # the same seeded noise on both sides (reproducible_noise: tests only), so the sums must agree
    alone = _server(privacy=DifferentialPrivacy(clip_norm=0.2, noise_multiplier=0.5, reproducible_noise=True))
    both = _server(privacy=DifferentialPrivacy(clip_norm=0.2, noise_multiplier=0.5, reproducible_noise=True),
                   secure=SecureAggregation())  # fmt: skip
    updates = _updates(alone.global_lora, alone.global_extra)
    alone.aggregate(3, updates)
    both.aggregate(3, updates)
    for key in alone.global_lora:
        assert torch.allclose(both.global_lora[key], alone.global_lora[key], atol=1e-5)


@pytest.mark.parametrize(
    ("aggregator", "what", "reason"),
    [
        (HetLoRA, DifferentialPrivacy, "unbounded"),
        (FLoRA, DifferentialPrivacy, "releasing each update"),
        (FLoRA, SecureAggregation, "must see every update"),
        (HetLoRA, SecureAggregation, "needs to see each update"),
    ],
)
def test_unsound_combinations_are_refused_with_the_reason(aggregator, what, reason):
    option = what(clip_norm=1.0, noise_multiplier=1.0) if what is DifferentialPrivacy else what()
    with pytest.raises(ConfigError, match=reason):
        if what is DifferentialPrivacy:
            option.setup(aggregator.__name__, 10, 4, 5)
        else:
            option.setup(aggregator.__name__)


def test_bad_privacy_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="give noise_multiplier, target_epsilon"):
        DifferentialPrivacy(clip_norm=1.0)
    with pytest.raises(ConfigError, match="clip_norm: must be a finite number > 0"):
        DifferentialPrivacy(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="count_noise_multiplier"):
        DifferentialPrivacy(noise_multiplier=1.0, adaptive_clipping=True, count_noise_multiplier=0.1).setup(
            "DimensionWise", 10, 4, 5
        )


def _private_fit(tmp_path, rounds, ckpt_path=None, **privacy):
    torch.manual_seed(0)
    trainer = FederatedTrainer(rounds=rounds, clients_per_round=2, ranks=[4, 2, 2, 2], max_local_steps=2,
                               aggregator=FedAvg() if privacy.pop("fedavg", False) else DimensionWise(),
                               privacy=DifferentialPrivacy(**privacy), secure_aggregation=SecureAggregation(),
                               root_dir=str(tmp_path), progress=False, checkpoint_every=1)  # fmt: skip
    results = trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=4), ckpt_path=ckpt_path)
    return trainer, results


def test_a_private_run_reports_epsilon_and_resumes_it_exactly(tmp_path, capsys):
    # seeded noise, so that the resumed model can be compared bit for bit (see test_privacy_soundness for
    # the default, secure noise: everything but the noise resumes exactly)
    seeded = {"clip_norm": 0.5, "noise_multiplier": 1.2, "reproducible_noise": True}
    trainer, results = _private_fit(tmp_path / "full", rounds=3, **seeded)
    accountant = PrivacyAccountant(sample_rate=2 / 4, delta=1e-5)
    for _ in range(3):
        accountant.step(1.2)
    assert results["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(), rel=1e-12)
    assert results["privacy"]["rounds"] == 3
    assert "NOT PRIVATE (reproducible noise)" in capsys.readouterr().out
    assert results["privacy"]["private"] is False
    assert all(h["privacy/not_private"] == 1.0 for h in trainer.history)
    assert [h["privacy/epsilon"] for h in trainer.history][-1] == results["privacy"]["epsilon"]
    assert all(h["secagg/passes"] == 1.0 for h in trainer.history)
    on_disk = json.loads((trainer.log_dir / "results.json").read_text())
    assert on_disk["privacy"]["epsilon"] == results["privacy"]["epsilon"]

    _private_fit(tmp_path / "resumed", rounds=2, **seeded)
    resumed, again = _private_fit(tmp_path / "resumed", rounds=3, ckpt_path="last", **seeded)
    assert again["privacy"]["epsilon"] == results["privacy"]["epsilon"]
    for key, value in trainer.global_lora.items():
        assert torch.equal(resumed.global_lora[key], value)


def test_the_run_stops_when_the_budget_is_spent(tmp_path, capsys):
    # epsilon after 1, 2, 3 rounds at q = 0.5, sigma = 1.2: 3.05, 4.16, 5.00
    trainer, results = _private_fit(tmp_path, rounds=3, clip_norm=0.5, noise_multiplier=1.2, target_epsilon=4.5)
    assert "stopping before round 2: privacy budget spent" in capsys.readouterr().out
    assert results["privacy"]["rounds"] == len(trainer.history) == 2
    assert results["privacy"]["epsilon"] == pytest.approx(4.164, abs=1e-3)
    assert results["global"]["complete"]["acc"] >= 0  # the model it stopped with was evaluated
    with pytest.raises(ConfigError, match="not even one round"):
        _private_fit(tmp_path, rounds=3, clip_norm=0.5, noise_multiplier=1.2, target_epsilon=3.0)
