"""Secure aggregation for heterogeneous ranks: pairwise masks that cancel in the sum.

What a client masks is its contribution to the server's streaming accumulator — per-tensor sums
already padded to the global rank and the per-dimension weight vector — so the server learns only
the per-dimension sums and weights that dimension-wise aggregation needs, never one client's values.
Shapes are the global ones for everyone, which is what makes masks of different-rank clients add up
(Flower's SecAgg+ masks each client's own shapes and fails or broadcasts silently on mixed ranks).

Protocol of one round (honest-but-curious server that relays public keys, as in Bonawitz et al.
2017 without the secret-sharing step):
1. every sampled client draws an X25519 key pair and publishes the public key;
2. clients a < b derive a shared 32-byte seed with X25519 + HKDF-SHA256 (bound to the round);
3. client a adds ChaCha20(seed_ab) to its fixed-point encoded contribution, client b subtracts it,
   modulo 2^k; the server adds all masked vectors and every pair's masks cancel exactly;
4. dropped client after masking: its partners' masks would not cancel, so the round's aggregation is
   redone without it — the survivors re-mask among themselves (their training is not repeated).
   Secret-shared seeds (SecAgg's recovery without a second pass) are not implemented.

Limits, enforced: the sum is taken modulo 2^62 in fixed point with ``fraction_bits``, so every client
checks before masking that K times its largest encoded value stays below 2^61 (K: the pass's
participants) — a sum that could wrap is refused, never decoded wrong. A pass with fewer than
``min_survivors`` participants (at least 2) is not unmasked: the "sum" of one client is that client's
contribution. What it does not protect against: a server that lies about who takes part (no
secret-sharing, no signatures), and clients that collude with the server against one client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

if TYPE_CHECKING:
    from fedilora.algorithms.base import Aggregator

MODULUS_BITS = 62  # sums of two residues stay below 2^63: int64 never overflows
FRACTION_BITS = 24  # fixed-point resolution 2^-24 ~ 6e-8 per client and coordinate
_MODULUS = 1 << MODULUS_BITS


class SumOverflow(ValueError):
    """A sum of encoded contributions could leave the fixed-point range (it would wrap silently)."""


def encode(x: Tensor, fraction_bits: int = FRACTION_BITS, participants: int = 1) -> Tensor:
    """round(x * 2^f) as a residue modulo 2^k (int64); negative values wrap around.

    Refuses (``SumOverflow``) values whose sum over ``participants`` clients could reach 2^(k-1) in
    magnitude: the modular sum would wrap and decode to a wrong value without any error."""
    scaled = torch.round(x.detach().double().cpu() * (1 << fraction_bits))
    largest = float(scaled.abs().max()) if scaled.numel() else 0.0
    if not largest * participants < float(_MODULUS // 2):  # also catches NaN and inf
        bound = 2.0 ** (MODULUS_BITS - 1 - fraction_bits) / participants
        raise SumOverflow(
            f"secure aggregation: a value of magnitude {largest / (1 << fraction_bits):.4g} summed over "
            f"{participants} clients can leave the fixed-point range (|value| < {bound:.4g} at fraction_bits="
            f"{fraction_bits}); lower trainer.secure_aggregation.fraction_bits or bound the updates "
            "(trainer.privacy.clip_norm)"
        )
    return torch.remainder(scaled.to(torch.int64), _MODULUS)


def decode(y: Tensor, fraction_bits: int = FRACTION_BITS) -> Tensor:
    """The float64 values of residues modulo 2^k (the upper half stands for negatives)."""
    signed = torch.where(y >= _MODULUS // 2, y - _MODULUS, y)
    return signed.double() / (1 << fraction_bits)


def add_mod(a: Tensor, b: Tensor) -> Tensor:
    return torch.remainder(a + b, _MODULUS)


class MaskingKey:
    """One client's X25519 key pair for one masking pass (a fresh pair for every pass: a key masks once)."""

    def __init__(self, private: bytes | None = None) -> None:
        self._private = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)

    @property
    def private(self) -> bytes:
        """The raw private key, for a client that keeps it between messages (it never leaves the client)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def shared_seed(self, peer_public: bytes, context: bytes) -> bytes:
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedilora-secagg/" + context).derive(shared)


def mask_stream(seed: bytes, numel: int) -> Tensor:
    """``numel`` residues modulo 2^k from ChaCha20 keyed by ``seed`` (a cryptographic PRG)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    raw = np.frombuffer(encryptor.update(b"\x00" * (8 * numel)), dtype=np.uint64) >> np.uint64(64 - MODULUS_BITS)
    return torch.from_numpy(raw.astype(np.int64))


def flatten(contribution: Mapping[str, Tensor]) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    """One float64 vector of every tensor, in sorted key order, and the layout to undo it."""
    keys = sorted(contribution)
    layout = [(k, contribution[k].shape) for k in keys]
    return torch.cat([contribution[k].detach().double().cpu().reshape(-1) for k in keys]), layout


def unflatten(vector: Tensor, layout: Sequence[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for key, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[key] = vector[offset : offset + n].reshape(shape)
        offset += n
    return out


def mask(
    contribution: Mapping[str, Tensor],
    client_id: int,
    key: MaskingKey,
    peers: Mapping[int, bytes],
    context: bytes,
    fraction_bits: int = FRACTION_BITS,
) -> Tensor:
    """The masked, encoded contribution of ``client_id``: encode(x) + sum_{j > id} m_ij - sum_{j < id} m_ji.

    ``peers`` maps the other participating clients' ids to their public keys; ``context`` binds the
    masks to one round (and pass), so masks are never reused.
    """
    vector, _ = flatten(contribution)
    masked = encode(vector, fraction_bits, participants=len(set(peers) | {client_id}))
    for peer, public in sorted(peers.items()):
        if peer == client_id:
            continue
        stream = mask_stream(key.shared_seed(public, context), masked.numel())
        masked = add_mod(masked, stream if client_id < peer else _MODULUS - stream)
    return masked


def unmask_sum(
    masked: Sequence[Tensor], layout: Sequence[tuple[str, torch.Size]], fraction_bits: int = FRACTION_BITS
) -> dict[str, Tensor]:
    """The sum of the contributions behind ``masked`` (every participant's vector must be there)."""
    total = torch.zeros_like(masked[0])
    for vector in masked:
        total = add_mod(total, vector)
    return unflatten(decode(total, fraction_bits), layout)


class SecureAggregation:
    """Pairwise-masked sums of the clients' contributions (``trainer.secure_aggregation`` in YAML).

    The server sees only masked vectors and their sum. A client that drops after masking (simulated in
    tests with ``dropped``) makes the round's masks fail to cancel: the survivors mask again among
    themselves and the sum is taken again (their training is not repeated).

    Args:
        fraction_bits: Fixed-point fraction bits (resolution 2^-fraction_bits per client and coordinate).
            With K clients, each value must stay below 2^(61 - fraction_bits) / K in magnitude.
        min_survivors: The fewest clients whose masked vectors are unmasked (at least 2): with fewer
            left after drops, the round is skipped rather than a lone client's contribution revealed.
    """

    def __init__(self, fraction_bits: int = FRACTION_BITS, min_survivors: int = 2) -> None:
        from fedilora.errors import ConfigError

        if not isinstance(fraction_bits, int) or not 8 <= fraction_bits <= 40:
            raise ConfigError(f"trainer.secure_aggregation.fraction_bits: must be in 8..40, got {fraction_bits}")
        if not isinstance(min_survivors, int) or min_survivors < 2:
            raise ConfigError(
                f"trainer.secure_aggregation.min_survivors: must be an integer >= 2, got {min_survivors} (the sum "
                "of one client is that client's contribution)"
            )
        self.fraction_bits, self.min_survivors = fraction_bits, min_survivors

    def setup(self, aggregator: Aggregator | str, per_round: int | None = None) -> SecureAggregation:
        """Check the aggregator (or its name): its ``secagg_refusal`` says why it cannot run on masked sums."""
        from fedilora.algorithms import refusal
        from fedilora.errors import ConfigError

        name, why_not = refusal(aggregator, "secagg_refusal")
        if why_not is not None:
            raise ConfigError(f"trainer.secure_aggregation: not available with {name}: {why_not}")
        if per_round is not None and per_round < self.min_survivors:
            raise ConfigError(
                f"trainer.clients_per_round: {per_round} client(s) per round is fewer than "
                f"trainer.secure_aggregation.min_survivors={self.min_survivors}: no round could be unmasked"
            )
        return self

    def sum(
        self, contributions: Mapping[int, Mapping[str, Tensor]], context: bytes, dropped: Sequence[int] = ()
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        """The sum of ``contributions`` (client id -> tensors) computed from masked vectors only (None:
        fewer than ``min_survivors`` left), and the protocol's cost: bytes the clients uploaded (masked
        vectors and public keys) and passes.

        The clients live in this process (the simulator): each pass draws their keys and masks here.
        ``dropped`` clients send nothing in the first pass."""
        _, layout = flatten(next(iter(contributions.values())))

        def one_pass(participants: list[int], number: int, pass_context: bytes) -> dict[int, Tensor]:
            keys = {c: MaskingKey() for c in participants}
            publics = {c: k.public for c, k in keys.items()}
            return {
                c: self._mask(contributions[c], c, keys[c], publics, pass_context)
                for c in participants
                if number > 1 or c not in dropped
            }

        masked, _, cost = self.run(sorted(contributions), context, one_pass)
        return (None if masked is None else self.unmask(masked, layout)), cost

    def run(
        self,
        participants: Sequence[int],
        context: bytes,
        one_pass: Callable[[list[int], int, bytes], Mapping[int, Tensor]],
        min_participants: int = 1,
    ) -> tuple[list[Tensor] | None, list[int], dict[str, float]]:
        """The masking passes of one round, whatever carries them (this process, or Flower messages).

        ``one_pass(participants, number, pass_context)`` has every participant mask with a fresh key
        pair and returns the masked vectors that arrived. A participant missing from them is dropped,
        and the pass is redone among the others (their training is not repeated); with fewer than
        ``min_participants`` left nothing is summed. Returns the complete pass's masked vectors (None:
        too few participants), the dropped clients, and the cost (bytes uploaded: masked vectors and
        public keys; passes).
        """
        participants, dropped, uploaded, passes = sorted(participants), [], 0, 0
        masked: Mapping[int, Tensor] | None = None
        while len(participants) >= max(self.min_survivors, min_participants):
            passes += 1
            masked = one_pass(participants, passes, context + f"/pass-{passes}".encode())
            uploaded += sum(32 + 8 * m.numel() for m in masked.values())
            missing = [c for c in participants if c not in masked]
            if not missing:
                break
            dropped += missing
            participants, masked = [c for c in participants if c in masked], None  # redo among the survivors
        cost = {"secagg/bytes_uploaded": float(uploaded), "secagg/passes": float(passes)}
        return (None if masked is None else [masked[c] for c in participants]), dropped, cost

    def unmask(self, masked: Sequence[Tensor], layout: Sequence[tuple[str, torch.Size]]) -> dict[str, Tensor]:
        return unmask_sum(masked, layout, self.fraction_bits)

    def _mask(self, contribution, client_id, key, publics, context) -> Tensor:
        return mask(contribution, client_id, key, publics, context, self.fraction_bits)
