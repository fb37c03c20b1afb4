"""Secure aggregation: the round's all-reduce carries masked integers whose masks cancel exactly in the sum.

Pairwise masking (Bonawitz et al. 2017, without its dropout recovery). Once per run every rank makes an X25519
key pair and the ranks exchange public keys; each pair of ranks (i, j) then shares a secret that no one else can
compute, and from it (HKDF-SHA256) a ChaCha20 key. For each call to ``sum`` the pair expands that key, with the
round index and a call counter as the nonce, into a vector of uniformly random int64 masks: rank i adds it when
i < j and subtracts it when i > j. Values are encoded in fixed point, ``round(x * 2**fractional_bits)`` as int64,
and all arithmetic, gloo's SUM included, wraps modulo 2**64, so the masks cancel exactly and the decoded result
is the sum of the fixed-point inputs, bit for bit the same whatever the masks were.

Threat model. The parties are honest but curious: every rank runs this code faithfully and may try to learn
from what it receives. What any rank, or an eavesdropper on the all-reduce ring, sees of another rank's vector is
its encoding plus a sum of pseudorandom masks keyed by secrets it does not hold: uniformly random int64, which
says nothing about the values (unlike a plain all-reduce, whose partial sums travel in the clear). The key
exchange itself sends only the 32-byte public keys, as uint8 tensors of that length (never pickled: no rank
unpickles what another sent); private keys never leave their process and are made afresh each run, so a restarted
run never reuses a mask. What the protocol does not give:
- the sum is public to all ranks, by design. Any slot of the vector that a single rank fills (per-client
  bookkeeping: loss sums, step and sample counts) is therefore revealed exactly; and with two ranks, or with all
  but one rank colluding, the sum minus one's own input is the other's input;
- no dropout recovery: a rank that dies mid-round makes the collective fail, and the round with it (restarted
  workers, e.g. under torchrun's ``--max-restarts``, make fresh keys);
- no protection against a malicious rank: one that sends garbage corrupts the sum undetected. Under
  ``federation.enrollment`` each public key is signed by its rank's site key, bound to the run's enrollment, and
  every rank checks every signature before any mask is made, so no party on the path can substitute keys; without
  enrollment there is no authentication beyond the process group itself;
- nothing is hidden from the party that learns the sum (no differential privacy).

Two bookkeeping counters travel in the masked vector too: the number of contributors, which must decode to the
world size (if ranks called ``sum`` out of step their masks do not cancel and it will not, with probability
1 - 2**-64), and the number of ranks whose values cannot be encoded (too large or not finite), so that every
rank raises the same error instead of one rank raising while the others wait in the all-reduce.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlm.errors import ConfigError, FedlmError
from fedlm.federation.enrollment import Membership
from fedlm.federation.wire import gather_uint8

FIELD = "federation.secure_aggregation.fractional_bits"
CONTROL = 3  # control slots appended to each vector: contributors, too-large ranks, non-finite ranks
PUBLIC_KEY_BYTES = 32  # an X25519 public key, gathered as a uint8 tensor of this length (fedlm.federation.wire)
PURPOSE = b"secure aggregation x25519 public key"


class SecureAggregationError(FedlmError, ValueError):
    """Values that fixed point cannot encode: raised on every rank alike, from the summed control slots."""


@dataclass
class SecureAggregationConfig:
    """The ``federation.secure_aggregation:`` section.

    Args:
        enabled: sum the clients' vectors through masked all-reduces instead of plain ones.
        fractional_bits: fixed-point precision: values are rounded to multiples of ``2**-fractional_bits`` before
            they are summed, and each rank's values must stay below ``2**(62 - fractional_bits) / world_size`` in
            magnitude so that the sum cannot overflow int64. 24 (the float32 mantissa) resolves 6e-8 and allows
            magnitudes up to 2.7e11 / world_size.
    """

    enabled: bool = False
    fractional_bits: int = 24

    def validate(self) -> None:
        if not 0 <= self.fractional_bits <= 52:
            raise ConfigError(
                f"{FIELD}={self.fractional_bits} must be in [0, 52] (float64 holds 53 significant bits); 24 keeps "
                "float32 precision with room for large sums."
            )


def max_magnitude(fractional_bits: int, world_size: int) -> float:
    """The largest |value| a rank may contribute: world_size such values, encoded, sum to about 2**62 at most,
    half of int64's range, so the decoded sum is never a wrapped one."""
    return 2.0 ** (62 - fractional_bits) / world_size


class SecureAggregator:
    """Sums float vectors over a process group so that no rank's vector ever travels in the clear.

    ``setup`` (once per run) and ``sum`` are collectives over ``group``: every rank of the group must call them,
    ``sum`` the same number of times per round, in the same order, with vectors of the same length. Takes a
    validated config (``SecureAggregationConfig.validate``; ``FederationConfig.validate`` calls it).
    """

    def __init__(self, config: SecureAggregationConfig, group: dist.ProcessGroup | None = None) -> None:
        self.config = config
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.scale = 2.0**config.fractional_bits
        self.pair_keys: dict[int, bytes] = {}  # other rank -> ChaCha20 key shared with it alone
        self.calls: dict[int, int] = {}  # round index -> calls so far, so that no nonce is ever used twice

    def setup(self, membership: Membership | None = None) -> None:
        """X25519 key agreement: public keys are gathered (signed by each rank's site key under enrollment, and
        checked), each pair derives its own key; private keys stay here."""
        if self.world_size == 1:
            return
        private = X25519PrivateKey.generate()
        mine = private.public_key().public_bytes_raw()
        signature = membership.sign(PURPOSE, self.global_rank(self.rank), mine) if membership else b""
        row = torch.frombuffer(bytearray(mine + signature), dtype=torch.uint8)
        width = PUBLIC_KEY_BYTES + len(signature)
        rows = gather_uint8(row, width, "secure aggregation: X25519 public keys", self.group)
        gathered = [r.numpy().tobytes() for r in rows]
        publics = [r[:PUBLIC_KEY_BYTES] for r in gathered]
        if membership is not None:
            self._check_signatures(membership, gathered)
        for other, their_public in enumerate(publics):
            if other == self.rank:
                continue
            secret = private.exchange(X25519PublicKey.from_public_bytes(their_public))
            low, high = sorted((self.rank, other))
            # Binding the ranks and both public keys into the derivation gives each pair and each run its own key.
            info = f"fedlm secure aggregation v1 pair {low} {high}".encode() + publics[low] + publics[high]
            self.pair_keys[other] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _check_signatures(self, membership: Membership, gathered: list[bytes]) -> None:
        """Every rank's public key signed by the site that rank enrolled as: else every rank raises, naming them."""
        forged = [
            f"rank {self.global_rank(r)} (site {membership.sites[self.global_rank(r)]!r})"
            for r, row in enumerate(gathered)
            if not membership.verify(PURPOSE, self.global_rank(r), row[:PUBLIC_KEY_BYTES], row[PUBLIC_KEY_BYTES:])
        ]
        if forged:
            raise SecureAggregationError(
                f"secure aggregation: the public key of {', '.join(forged)} is not signed by its enrolled site's key "
                "for this run: a key was substituted on the way or the rank is not the site it enrolled as. No mask "
                "was made and nothing was summed; check the network path between the sites."
            )

    def sum(self, tensor: torch.Tensor, round_index: int) -> torch.Tensor:
        """The sum over the group's ranks of ``tensor`` (a float vector), as float64 rounded to fixed point, on
        ``tensor``'s device. The masking and the all-reduce run on the CPU on every rank (gloo, whatever the device).

        Exact: the result is the sum of each rank's ``round(x * 2**fractional_bits)``, divided by the scale, and so
        is identical on every rank and independent of the masks. With one process it is the rounded ``tensor``.
        """
        if self.world_size > 1 and len(self.pair_keys) != self.world_size - 1:
            raise RuntimeError("SecureAggregator.sum was called before setup(): call setup() once on every rank.")
        if round_index < 0:
            raise ValueError(f"round_index={round_index} must be >= 0.")
        call = self.calls.get(round_index, 0)
        self.calls[round_index] = call + 1
        values = tensor.detach().reshape(-1).to("cpu", torch.float64)
        encoded = self._encode(values)
        if self.world_size > 1:
            encoded += self._mask(encoded.numel(), round_index, call)  # int64: wraps modulo 2**64
            dist.all_reduce(encoded, group=self.group)
        return self._decode(encoded).view(tensor.shape).to(tensor.device)

    # -- fixed point, with the control slots at the end ------------------------------------------------------

    def _encode(self, values: torch.Tensor) -> torch.Tensor:
        """int64 fixed point; values that cannot be encoded are sent as 0 and counted, so every rank can refuse."""
        finite = torch.isfinite(values)
        values = torch.where(finite, values, 0.0)
        limit = max_magnitude(self.config.fractional_bits, self.world_size)
        too_large = bool((values.abs() >= limit).any())
        if too_large:
            values = torch.zeros_like(values)
        encoded = torch.round(values * self.scale).to(torch.int64)  # the product is exact: a power of two
        control = torch.tensor([1, int(too_large), int(not finite.all())], dtype=torch.int64)
        return torch.cat([encoded, control])

    def _decode(self, summed: torch.Tensor) -> torch.Tensor:
        contributors, too_large, non_finite = summed[-CONTROL:].tolist()
        if contributors != self.world_size:
            raise RuntimeError(
                f"secure aggregation masks did not cancel ({contributors} contributors decoded, {self.world_size} "
                "ranks): the ranks called SecureAggregator.sum out of step (different round_index, number of calls "
                "or order). Every rank must make the same sequence of calls."
            )
        if non_finite:
            raise SecureAggregationError(
                f"secure aggregation: {non_finite} rank(s) tried to sum non-finite values (nan or inf), which fixed "
                "point cannot encode: the training has likely diverged (lower the learning rate or clip gradients)."
            )
        if too_large:
            limit = max_magnitude(self.config.fractional_bits, self.world_size)
            raise SecureAggregationError(
                f"secure aggregation: {too_large} rank(s) hold values of magnitude >= {limit:.3g}, which would "
                f"overflow int64 when {self.world_size} ranks' values are summed with {FIELD}="
                f"{self.config.fractional_bits}. Lower {FIELD} (each bit less doubles the range and halves the "
                "precision)."
            )
        return summed[:-CONTROL].to(torch.float64) / self.scale

    # -- masks ------------------------------------------------------------------------------------------------

    def _mask(self, numel: int, round_index: int, call: int) -> torch.Tensor:
        """This rank's share of the masks: + the stream it shares with each higher rank, - each lower rank's.

        Each stream is the ChaCha20 keystream of the pair's key (a stream cipher is a cryptographically secure
        generator, unlike torch's Mersenne Twister, and cheap: about 4 ms per 600k int64 on one core), with the
        round index and the call counter as its nonce, so every call of every round gets fresh masks. It touches
        no torch RNG state, so turning secure aggregation on does not change a run's random streams.
        """
        total = torch.zeros(numel, dtype=torch.int64)
        nonce = struct.pack("<IQI", 0, round_index, call)  # 4-byte block counter (from 0), then the 12-byte nonce
        for other, key in self.pair_keys.items():
            stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * numel))
            mask = torch.frombuffer(bytearray(stream), dtype=torch.int64)
            if self.rank < other:
                total += mask
            else:
                total -= mask
        return total
