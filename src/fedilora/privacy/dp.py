"""Client-level differential privacy for heterogeneous-rank LoRA.

A client's update u_k is its LoRA delta from the adapter it received, zero-padded along the rank axis
to the global rank R, together with its head delta. It is clipped to L2 norm C on the client. The
server adds the clipped updates, unweighted, into one sum per tensor, S, and counts per rank
dimension how many sampled clients have it, n_i (every client covers the head). One client moves S by
at most C in L2, so releasing S + N(0, sigma^2 C^2 I) is the Gaussian mechanism with noise multiplier
sigma for all coordinates at once; the accountant composes it over rounds.

The new global value of rank dimension i is previous_i + (S_i + noise_i) / n_i, so the noise left on
the average there has std sigma * C / n_i: it is calibrated to how many clients cover the dimension.
Noising the average with one std sigma * C / K, as if every coordinate averaged all K clients, gives
the dimensions that only a few high-rank clients train far less noise than the guarantee needs.
``DimensionWiseDelta`` counts a client without dimension i as a zero delta there, so its step is
(S_i + noise_i) / K on every dimension: the same guarantee, with noise sigma * C / K everywhere (its
steps on the high-rank dimensions are smaller by n_i / K instead).
Uniform weights replace p_k = n_k / sum n_j because sample counts are private and unbounded.

What is public and what is released. K and n_i are taken from the round's plan (the seeded sampler
and the clients' ranks are configuration), not from which updates arrived: a client whose update
fails or is rejected adds a zero delta, so one client still moves S by at most C and the divisors do
not depend on data. The server makes no other data-dependent decision under DP: the norm-outlier
rule and the skip rule do not run. The noise comes from a CSPRNG (ChaCha20 keyed by 32 bytes of
``os.urandom`` drawn at each start and never stored; cf. opacus' ``secure_mode``), so no seed, config
or checkpoint can regenerate it;
``reproducible_noise`` (tests only) draws it from a seeded generator and every report of such a run
says NOT PRIVATE.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.aggregation import Aggregator, State, rank_axis
from fedilora.lora_ops import covers, pad_rank
from fedilora.privacy.accounting import PrivacyAccountant, noise_multiplier_for

pad_to_rank = pad_rank  # zero-pad every lora_A along rows, every lora_B along columns (fedilora.lora_ops)


def delta(new: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> State:
    return {k: v - received[k].to(v.device, v.dtype) for k, v in new.items()}


def l2_norm(states: Sequence[Mapping[str, Tensor]]) -> float:
    """The L2 norm of all tensors of ``states`` taken as one vector (accumulated in float64)."""
    squared = sum((float(t.double().square().sum()) for s in states for t in s.values()), 0.0)
    return math.sqrt(squared)


def clip(states: Sequence[Mapping[str, Tensor]], clip_norm: float) -> tuple[list[State], float]:
    """``states`` scaled by min(1, C / ||states||) as one vector; returns them and the norm before clipping."""
    norm = l2_norm(states)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [{k: v * factor for k, v in s.items()} for s in states], norm


class SecureNoise:
    """A round's cryptographically secure random bits: the ChaCha20 keystream of a 32-byte key drawn from
    ``os.urandom`` when the run starts (shared by its processes, never written anywhere), with the round
    as nonce. Every process of a run draws the same noise; nothing a run stores can reproduce it."""

    def __init__(self, key: bytes, round: int) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        nonce = round.to_bytes(16, "little", signed=True)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def random_bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


def secure_normal(shape: Sequence[int] | torch.Size, source: SecureNoise | None = None) -> Tensor:
    """Standard normal float64 samples by Box-Muller over 53-bit uniforms in (0, 1], from ``source`` or,
    without one, from ``os.urandom``."""
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    raw = source.random_bytes(16 * pairs) if source is not None else os.urandom(16 * pairs)
    bits = torch.frombuffer(bytearray(raw), dtype=torch.int64).view(2, pairs)
    uniform = ((bits >> 11) & ((1 << 53) - 1)).double().add_(1.0).mul_(2.0**-53)  # (0, 1]: log is finite
    radius = (-2.0 * uniform[0].log()).sqrt()
    angle = (2.0 * math.pi) * uniform[1]
    return torch.cat([radius * angle.cos(), radius * angle.sin()])[:numel].reshape(tuple(shape))


NoiseSource = torch.Generator | SecureNoise | None


def standard_normal(shape: Sequence[int] | torch.Size, source: NoiseSource) -> Tensor:
    """N(0, 1) float64 samples: secure (a ``SecureNoise``, or None: ``os.urandom``) or from a seeded
    ``torch.Generator`` (``reproducible_noise``, tests only)."""
    if isinstance(source, torch.Generator):
        return torch.randn(tuple(shape), generator=source, dtype=torch.float64)
    return secure_normal(shape, source)


def add_noise(sums: Mapping[str, Tensor], std: float, generator: NoiseSource) -> State:
    """``sums`` + N(0, std^2) on every coordinate, drawn on the CPU (``generator``: see ``standard_normal``)."""
    return {k: v + (standard_normal(v.shape, generator) * std).to(v.device, v.dtype) for k, v in sums.items()}


def coverage(ranks: Sequence[int], global_rank: int) -> Tensor:
    """n_i: how many of the clients with ``ranks`` have rank dimension i (``[R]``, float64)."""
    return covers(ranks, global_rank).sum(0).to(torch.float64)


def average_noise_std(counts: Tensor, noise_multiplier: float, clip_norm: float) -> Tensor:
    """The std of the noise left on each dimension's average: sigma * C / n_i (inf where n_i = 0)."""
    return noise_multiplier * clip_norm / counts


def apply_average(
    previous: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts: Tensor, keys_with_rank: bool = True
) -> State:
    """previous + sums / n per rank dimension (``counts`` = n_i); dimensions no client covers keep ``previous``."""
    out = {}
    for key, prev in previous.items():
        if keys_with_rank:
            axis = rank_axis(key)
            n = counts.to(prev.device, torch.float64)
            view = [1] * prev.dim()
            view[axis] = -1
            n = n.view(view)
            step = torch.where(n > 0, sums[key].double() / n.clamp_min(1.0), 0.0)
        else:
            step = sums[key].double() / float(counts)
        out[key] = (prev.double() + step).to(prev.dtype)
    return out


def adapted_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Adaptive clipping (Andrew et al. 2021): C <- C * exp(-eta * (b - gamma)), b the noisy fraction of
    clients whose update norm was <= C, gamma the target quantile. The clip norm follows that quantile."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


#: what a reproducible-noise run is called wherever its results are reported
NOT_PRIVATE = "NOT PRIVATE (reproducible noise)"
_MAX_NOISE_MULTIPLIER = 1e3  # opacus' RDP analysis slows past this (0.9 s per epsilon at 1e3, minutes at inf)


def _check_number(key: str, value: float | None, low: float, high: float = math.inf, *, open_low: bool = True,
                  open_high: bool = False, optional: bool = False, hint: str = "") -> None:  # fmt: skip
    """One ConfigError line naming ``trainer.privacy.<key>`` unless ``value`` is a finite number in range."""
    from fedilora.errors import ConfigError

    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        where = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}" if math.isfinite(high) else (
            f"> {low:g}" if open_low else f">= {low:g}")
        raise ConfigError(f"trainer.privacy.{key}: must be a finite number {'in ' if math.isfinite(high) else ''}"
                          f"{where}{' or null' if optional else ''}, got {value!r}{hint}")  # fmt: skip


def sum_noise_multiplier(total: float, count_noise_multiplier: float) -> float:
    """The noise multiplier left for the update sums when the clipped-count query also spends budget:
    sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1)."""
    rest = total**-2 - (2.0 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise_multiplier {count_noise_multiplier} is too small for noise multiplier {total}: "
            f"it must exceed {total / 2:.4g}"
        )
    return rest**-0.5


#: under DP, the figures a round may report: released (noised) or public ones; everything else is computed
#: from single clients' raw updates or data and is reported only with ``log_client_metrics``
RELEASED_PREFIXES = ("global/", "privacy/", "secagg/", "comm/bytes_downloaded", "round/time_s", "round/skipped")


def released_only(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` without the per-client and data-dependent figures that the accountant does not cover."""
    return {k: v for k, v in metrics.items() if k.startswith(RELEASED_PREFIXES)}


class DifferentialPrivacy:
    """Client-level differential privacy of the released global model (``trainer.privacy`` in YAML).

    Works with ``DimensionWise`` (each rank dimension averaged over the clients that have it, noise
    sigma * C / n_i), ``DimensionWiseDelta`` (averaged over all K sampled clients, noise sigma * C / K)
    and ``FedAvg``; refuses a method whose ``dp_refusal`` (``fedilora.algorithms.base``) says why not.

    Args:
        clip_norm: C, the L2 bound of one client's update (LoRA delta padded to the global rank, and
            head delta); the initial value under adaptive clipping.
        noise_multiplier: sigma: the noise on the sums has std sigma * C. Derived from
            ``target_epsilon`` when null.
        target_epsilon: The privacy budget at ``delta``: with ``noise_multiplier`` null, sigma is the
            smallest that keeps ``trainer.rounds`` rounds within it; in any case the run stops before a
            round that would exceed it.
        delta: delta of the (epsilon, delta) guarantee.
        adaptive_clipping: Move C towards the ``target_quantile`` of the update norms each round
            (Andrew et al. 2021); the noisy count of unclipped updates spends part of the budget.
        target_quantile: gamma, the fraction of updates that should not be clipped.
        clip_learning_rate: eta of the geometric clip-norm update.
        count_noise_multiplier: sigma_b of the unclipped count (default: max(clients per round / 20,
            sigma)); must exceed sigma / 2.
        accountant: opacus accountant: ``rdp`` or ``prv``.
        reproducible_noise: FOR TESTS ONLY: draw the noise from a generator seeded by the run's seed and
            the round, so two runs of one config release the same model. Anyone with the config can
            regenerate and subtract that noise: the run gives no privacy, and its table, results.json
            and TensorBoard say NOT PRIVATE. Default: the OS's cryptographically secure generator.
        log_client_metrics: Also log and print per-client figures that the accountant does not cover
            (each client's train loss, rejected clients and why, personalized metrics on the clients'
            own test splits). Off by default: under DP only released (noised) or public figures are
            reported.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_noise_multiplier: float | None = None,
        accountant: str = "rdp",
        reproducible_noise: bool = False,
        log_client_metrics: bool = False,
    ) -> None:
        from fedilora.errors import ConfigError

        _check_number("clip_norm", clip_norm, 0.0)
        if noise_multiplier is None and target_epsilon is None:
            raise ConfigError("trainer.privacy: give noise_multiplier, target_epsilon or both")
        _check_number("noise_multiplier", noise_multiplier, 1e-12, _MAX_NOISE_MULTIPLIER, open_low=False,
                      optional=True)  # fmt: skip
        _check_number("target_epsilon", target_epsilon, 0.0, optional=True,
                      hint=" (for no privacy, leave trainer.privacy out)")  # fmt: skip
        _check_number("delta", delta, 0.0, 1.0, open_high=True)
        _check_number("target_quantile", target_quantile, 0.0, 1.0, open_high=True)
        # eta <= 0 makes C run away from the quantile instead of following it
        _check_number("clip_learning_rate", clip_learning_rate, 0.0, 10.0)
        _check_number("count_noise_multiplier", count_noise_multiplier, 0.0, _MAX_NOISE_MULTIPLIER, optional=True)
        if accountant not in ("rdp", "prv"):
            raise ConfigError(f"trainer.privacy.accountant: unknown {accountant!r}; allowed: rdp, prv")
        self.reproducible_noise, self.log_client_metrics = bool(reproducible_noise), bool(log_client_metrics)
        self.initial_clip_norm = clip_norm
        #: the secret of this start's noise (``SecureNoise``); processes of one run share rank 0's
        self.noise_key = os.urandom(32)
        self.clip_norm, self.noise_multiplier, self.target_epsilon = clip_norm, noise_multiplier, target_epsilon
        self.delta, self.adaptive_clipping, self.target_quantile = delta, adaptive_clipping, target_quantile
        self.clip_learning_rate, self.count_noise_multiplier = clip_learning_rate, count_noise_multiplier
        self.mechanism = accountant
        # what ran: sigma (given, or derived from the budget), the count query's sigma_b and the sums' sigma_delta;
        # the init arguments stay as given (the checkpoint's fingerprint compares those)
        self.sigma, self.count_sigma, self.sum_multiplier = noise_multiplier or 0.0, count_noise_multiplier, 0.0
        self.accountant: PrivacyAccountant | None = None

    def setup(self, aggregator: Aggregator | str, num_clients: int, per_round: int, rounds: int) -> DifferentialPrivacy:
        """Check the aggregator (or its name), derive sigma from the budget if needed, and start the accountant."""
        from fedilora.algorithms import refusal
        from fedilora.errors import ConfigError

        name, why_not = refusal(aggregator, "dp_refusal")
        if why_not is not None:
            raise ConfigError(f"trainer.privacy: not available with {name}: {why_not}")
        sample_rate = per_round / num_clients
        self.sigma = self.noise_multiplier
        if self.sigma is None:
            self.sigma = noise_multiplier_for(self.target_epsilon, self.delta, sample_rate, rounds, self.mechanism)
        self.sum_multiplier = self.sigma
        if self.adaptive_clipping:
            # per_round / 20 (the paper's choice for hundreds of clients per round), but never below sigma:
            # that costs the update sums at most 15% more noise
            self.count_sigma = self.count_noise_multiplier or max(per_round / 20.0, self.sigma)
            try:
                self.sum_multiplier = sum_noise_multiplier(self.sigma, self.count_sigma)
            except ValueError as err:
                raise ConfigError(f"trainer.privacy.count_noise_multiplier: {err}") from None
        self.accountant = PrivacyAccountant(sample_rate, self.delta, self.mechanism)
        if self.target_epsilon is not None and self.accountant.epsilon_after(self.sigma) > self.target_epsilon:
            raise ConfigError(
                f"trainer.privacy.target_epsilon: {self.target_epsilon} allows not even one round at noise multiplier "
                f"{self.sigma} (epsilon {self.accountant.epsilon_after(self.sigma):.4g}); "
                "raise noise_multiplier or leave it null to derive it"
            )
        return self

    def budget_problem(self) -> str | None:
        """Why the next round must not run: it would take epsilon past ``target_epsilon``."""
        if self.target_epsilon is None:
            return None
        after = self.accountant.epsilon_after(self.sigma)
        if after <= self.target_epsilon * (1 + 1e-9):
            return None
        return (
            f"privacy budget spent: one more round would take epsilon from {self.accountant.epsilon():.4g} to "
            f"{after:.4g} > trainer.privacy.target_epsilon={self.target_epsilon} (delta={self.delta})"
        )

    def clip_update(
        self, lora_delta: Mapping[str, Tensor], extra_delta: Mapping[str, Tensor]
    ) -> tuple[State, State, bool]:
        """The client's side: its deltas clipped to C together, and whether they were within C."""
        (lora, extra), norm = clip([lora_delta, extra_delta], self.clip_norm)
        return lora, extra, norm <= self.clip_norm

    def noise_generator(self, seed: int, round: int) -> NoiseSource:
        """Where a round's noise comes from: ``SecureNoise`` with this run's secret key, or with
        ``reproducible_noise`` a generator seeded by ``seed`` (tests only)."""
        if self.reproducible_noise:
            return torch.Generator().manual_seed(seed)
        return SecureNoise(self.noise_key, round)

    def noise(self, sums: Mapping[str, Tensor], generator: NoiseSource) -> State:
        return add_noise(sums, self.sum_multiplier * self.clip_norm, generator)

    def after_round(self, unclipped: float, count: int, generator: NoiseSource) -> dict[str, float]:
        """Account for one released round and adapt C; returns the round's privacy figures.

        ``count``: the round's planned clients (public). The next C is a function of the noised count
        only, so it is released output too."""
        from fedilora.errors import RunFailed

        metrics = {"privacy/clip_norm": self.clip_norm, "privacy/noise_std": self.sum_multiplier * self.clip_norm}
        if self.adaptive_clipping:
            count_noise = float(standard_normal((), generator))
            fraction = (unclipped + count_noise * self.count_sigma) / count
            metrics["privacy/unclipped_fraction"] = fraction
            clip_norm = adapted_clip_norm(self.clip_norm, fraction, self.target_quantile, self.clip_learning_rate)
            if not (math.isfinite(clip_norm) and clip_norm > 0):  # exp over- or underflowed
                raise RunFailed(
                    f"adaptive clipping: the clip norm became {clip_norm} after clip norm {self.clip_norm:.4g} and "
                    f"noisy unclipped fraction {fraction:.4g}; lower trainer.privacy.clip_learning_rate "
                    f"({self.clip_learning_rate})",
                    {},
                )
            self.clip_norm = clip_norm
        self.accountant.step(self.sigma)
        metrics["privacy/epsilon"] = self.accountant.epsilon()
        if self.reproducible_noise:
            metrics["privacy/not_private"] = 1.0
        return metrics

    def summary(self) -> dict[str, float | bool | str]:
        out: dict[str, float | bool | str] = {
            "epsilon": self.accountant.epsilon() if self.accountant else 0.0,
            "delta": self.delta,
            "noise_multiplier": float(self.sigma),
            "clip_norm": self.clip_norm,
            "rounds": self.accountant.rounds if self.accountant else 0,
            "noise": NOT_PRIVATE if self.reproducible_noise else "secure (ChaCha20, key from os.urandom)",
            "private": not self.reproducible_noise,
        }
        return out

    def settings(self) -> dict[str, float | bool | str | None]:
        """What a resume must keep: the options as given, and the multipliers the rounds ran with."""
        return {
            "clip_norm": self.initial_clip_norm,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "adaptive_clipping": self.adaptive_clipping,
            "target_quantile": self.target_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "accountant": self.mechanism,
            "reproducible_noise": self.reproducible_noise,
            "noise_multiplier": self.noise_multiplier,
            "count_noise_multiplier": self.count_noise_multiplier,
            "sigma": self.sigma,
            "count_sigma": self.count_sigma,
            "sum_multiplier": self.sum_multiplier,
        }

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "clip_norm": self.clip_norm, "settings": self.settings()}

    def load_state_dict(self, state: Mapping) -> None:
        """Go on from a checkpoint: the same settings (else ``ConfigError``), the multipliers that ran,
        the accountant's history and the (adapted) clip norm."""
        from fedilora.errors import ConfigError

        saved = state.get("settings")
        if saved is not None:
            ours = self.settings()
            # sigma may differ only because trainer.rounds changed the derivation: the saved one is what ran
            ran = ("sigma", "count_sigma", "sum_multiplier")
            changed = [k for k in ours if k not in ran and saved.get(k) != ours[k]]
            if changed:
                shown = "; ".join(f"trainer.privacy.{k}: checkpoint {saved.get(k)!r}, config {ours[k]!r}"
                                  for k in changed)  # fmt: skip
                raise ConfigError(
                    f"--ckpt_path: the checkpoint's rounds ran under other privacy settings ({shown}); a resume "
                    "must keep them (start a new run to change them)"
                )
            self.sigma, self.count_sigma, self.sum_multiplier = (saved[k] for k in ran)
        self.accountant.load_state_dict(state["accountant"])
        self.clip_norm = float(state["clip_norm"])
