"""What a run under differential privacy prints at its start: what DP changes in it, and what it does not cover."""

from __future__ import annotations

from collections.abc import Callable

from fedilora.privacy.dp import DifferentialPrivacy


def say_what_dp_changes(privacy: DifferentialPrivacy, update_norm_factor: float | None, print_: Callable) -> None:
    if privacy.reproducible_noise:
        print_("WARNING: trainer.privacy.reproducible_noise: the noise is drawn from the run's seed and can be "
               "regenerated from its config: NOT PRIVATE (for tests only)")  # fmt: skip
    if update_norm_factor is not None:
        print_("note: trainer.update_norm_factor is off under trainer.privacy (its median would let one "
               "client decide whether others count); clipping bounds every update instead")  # fmt: skip
    if privacy.log_client_metrics:
        print_("WARNING: trainer.privacy.log_client_metrics: per-client figures (train loss, rejected clients, "
               "personalized metrics, edits) are logged and printed; epsilon does not cover them")  # fmt: skip
    else:
        print_("note: under trainer.privacy only released figures are reported (global metrics, privacy/*); "
               "per-client ones need trainer.privacy.log_client_metrics: true (epsilon does not cover them)")
