"""Seeds derived from several parts, so that (seed, round, client, rank) streams never collide."""

import hashlib


def derive_seed(*parts: int | str) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
