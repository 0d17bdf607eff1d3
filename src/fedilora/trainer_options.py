"""The checks of ``FederatedTrainer``'s options: each bad value is one ``ConfigError`` line naming the option."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.seed import max_seed_value, min_seed_value

from fedilora.algorithms.base import Aggregator
from fedilora.errors import ConfigError


def check_trainer_options(options: Mapping[str, Any]) -> None:
    """``options``: the trainer's ``__init__`` arguments by name."""
    for option in ("rounds", "local_epochs", "eval_every"):
        if options[option] < 1:
            raise ConfigError(f"trainer.{option}: must be >= 1, got {options[option]}")
    max_local_steps, ranks = options["max_local_steps"], options["ranks"]
    if max_local_steps is not None and max_local_steps < 1:
        raise ConfigError(f"trainer.max_local_steps: must be >= 1 or null, got {max_local_steps}")
    rank_list = [ranks] if isinstance(ranks, int) else list(ranks)
    if not rank_list or any(not isinstance(r, int) or r <= 0 for r in rank_list):
        raise ConfigError(f"trainer.ranks: every LoRA rank must be a positive integer, got {ranks}")
    global_lora_rank = options["global_lora_rank"]
    if global_lora_rank is not None and global_lora_rank < max(rank_list):
        raise ConfigError(
            f"trainer.global_lora_rank: {global_lora_rank} is smaller than the largest client rank {max(rank_list)}"
        )
    clients_per_round = options["clients_per_round"]
    if isinstance(clients_per_round, float) and not 0.0 < clients_per_round <= 1.0:
        raise ConfigError(f"trainer.clients_per_round: a fraction must be in (0, 1], got {clients_per_round}")
    if isinstance(clients_per_round, int) and clients_per_round < 1:
        raise ConfigError(f"trainer.clients_per_round: must be >= 1, got {clients_per_round}")
    if (min_clients := options["min_clients_per_round"]) < 1:
        raise ConfigError(f"trainer.min_clients_per_round: must be >= 1, got {min_clients}")
    if (max_norm := options["max_update_norm"]) is not None and not max_norm > 0:
        raise ConfigError(f"trainer.max_update_norm: must be > 0 or null, got {max_norm}")
    if (factor := options["update_norm_factor"]) is not None and not factor > 1:
        raise ConfigError(f"trainer.update_norm_factor: must be > 1 or null (off), got {factor}")
    if (timeout := options["round_timeout_s"]) is not None and not (0 < timeout < float("inf")):
        raise ConfigError(f"trainer.round_timeout_s: must be a finite number of seconds > 0 or null, got {timeout}")
    if (every := options["checkpoint_every"]) is not None and every < 1:
        raise ConfigError(f"trainer.checkpoint_every: must be >= 1 or null, got {every}")
    if (keep_last := options["keep_last"]) < 1:
        raise ConfigError(f"trainer.keep_last: must be >= 1, got {keep_last}")
    name = options["name"]
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:  # the run folder stays in root_dir
        raise ConfigError(
            "trainer.name: a run name is one folder name inside trainer.root_dir (no '/', '\\' or '..'), "
            f"got {name!r}"
        )
    seed = options["seed"]
    if isinstance(seed, bool) or not min_seed_value <= seed <= max_seed_value:
        raise ConfigError(
            f"trainer.seed: must be an integer in [{min_seed_value}, {max_seed_value}] (what Lightning's "
            f"seed_everything accepts), got {seed}"
        )
    if (memory := options["personal_memory_mb"]) is not None and not memory >= 0:
        raise ConfigError(f"trainer.personal_memory_mb: must be >= 0 or null (no limit), got {memory}")
    if not isinstance(aggregator := options["aggregator"], Aggregator):
        raise ConfigError(f"trainer.aggregator: {aggregator!r} is not a fedilora.algorithms.Aggregator")
