"""Each rank's journal of the DP rounds it has released: a released round, run again, releases the same bits.

Under ``federation.dp`` a round's noised sum leaves the ranks at the round's last batch, but the accountant's count
lands in the round checkpoint, after validation. A crash in between and the documented restart (``--ckpt_path
last``) would re-run that round: the same clipped updates (training is bitwise reproducible) with fresh noise, a
second release that no accountant counts. So the noise is drawn from a secret that this journal keeps beside the run
(mode 0600: whoever reads it can subtract the noise), and before each release the journal records a hash of what
this rank sends: a re-run sends the same bits, and one that would send different bits is refused before anything
leaves. The journal is per run configuration (a hash of the federation, model and data settings): another run in
the same folder gets its own secret, since noise shared by two different releases would cancel in their difference.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlm.checkpointing import atomic_write
from fedlm.errors import FedlmError


class ReleaseError(FedlmError):
    """A released DP round would be released again with different bits."""


def fingerprint(settings: dict[str, Any]) -> str:
    """A hash of a run's settings: equal for a restart of the same run, different for another run."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ReleaseJournal:
    path: Path
    secret: int  # seeds the DP noise of this rank's clients, round by round
    released: dict[int, str] = field(default_factory=dict)  # round index -> sha256 of the payload this rank sent

    @classmethod
    def open(cls, folder: Path, rank: int, run: str) -> ReleaseJournal:
        """This run's journal for ``rank`` in ``folder``: the one a crashed attempt left, or a new one."""
        path = Path(folder) / f"dp-releases-{run}-rank{rank}.json"
        if not path.is_file():
            journal = cls(path, secrets.randbits(63))
            journal.save()
            return journal
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ReleaseError(f"{path} holds the DP noise secret but others can read it: chmod 600 {path}.")
        data = json.loads(path.read_text())
        return cls(path, int(data["secret"]), {int(k): v for k, v in data["released"].items()})

    def record(self, round_index: int, payload: torch.Tensor) -> None:
        """Before ``payload`` (this rank's noised contribution to round ``round_index``) is sent: note it, or check
        that it is what an earlier attempt sent."""
        digest = hashlib.sha256(payload.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        earlier = self.released.get(round_index)
        if earlier is None:
            self.released[round_index] = digest
            self.save()
        elif earlier != digest:
            raise ReleaseError(
                f"round {round_index + 1} was released before (journal {self.path}) and this attempt would release "
                "different bits: with fresh noise the two releases together would spend privacy that no accountant "
                "counted. Nothing was sent. Resume with the same settings and data, or start a new run folder."
            )

    def save(self) -> None:
        """Atomically, readable by this user only."""
        data = json.dumps({"secret": self.secret, "released": self.released}).encode()
        atomic_write(self.path, lambda file: file.write(data), mode=0o600)
