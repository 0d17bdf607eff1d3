"""Privacy accounting for client-level DP-FedAvg, through opacus's accountants.

One federated round is one step of the subsampled Gaussian mechanism: each client is in the round
with probability q = clients_per_round / num_clients and the released sums carry noise with
multiplier sigma. opacus analyses Poisson subsampling; fedilora samples a fixed number of clients
without replacement, the usual approximation in DP-FedAvg (McMahan et al. 2018) — said in the README.
"""

from __future__ import annotations

from typing import Any, Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedilora.errors import ConfigError

Mechanism = Literal["rdp", "prv"]


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, mechanism: Mechanism = "rdp"
) -> float:
    """The smallest noise multiplier that keeps ``rounds`` rounds within (``target_epsilon``, ``delta``)."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=mechanism,
            )
        )
    except ValueError as err:
        raise ConfigError(
            f"privacy.target_epsilon: no noise multiplier reaches epsilon={target_epsilon} at delta={delta} "
            f"over {rounds} rounds with sampling rate {sample_rate:.4g} ({err})"
        ) from None


class PrivacyAccountant:
    """epsilon spent so far at a fixed delta; its state is part of the checkpoint."""

    def __init__(self, sample_rate: float, delta: float, mechanism: Mechanism = "rdp") -> None:
        self.sample_rate, self.delta, self.mechanism = sample_rate, delta, mechanism
        self._accountant = create_accountant(mechanism)

    def step(self, noise_multiplier: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate)

    @property
    def rounds(self) -> int:
        return sum(steps for _, _, steps in self._accountant.history)

    def epsilon(self) -> float:
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))

    def epsilon_after(self, noise_multiplier: float, rounds: int = 1) -> float:
        """epsilon if ``rounds`` more rounds ran with ``noise_multiplier`` (the budget check before a round)."""
        probe = create_accountant(self.mechanism)
        probe.history = [*self._accountant.history, (noise_multiplier, self.sample_rate, rounds)]
        return float(probe.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self._accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
