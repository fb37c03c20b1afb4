"""Enrollment: only the sites of a roster take part, each proving at start that it holds its site's key.

A site has an Ed25519 identity key (``fedlm keys new``); the federation's roster (``fedlm keys roster``) lists
every site's public key and the clients it hosts, and every node holds the same roster file. Right after the
process group forms, before any tensor derived from data moves, every rank runs ``Enrollment.prove``:

1. it draws a fresh 32-byte nonce, and all ranks all-gather their nonces and the SHA-256 of their roster;
2. it signs a transcript of the run (a hash of every rank's nonce and roster hash in rank order, the world size,
   its rank and the site it claims) with its site key, and all ranks all-gather the claimed site names and the
   signatures;
3. it checks every rank: that it holds the same roster, claims a site of the roster, signed with that site's key,
   and trains only clients that the roster gives to that site (``Topology.hosted_clients``).

Every rank sees the same gathered bytes and so reaches the same verdict: on any failure every honest rank raises
``EnrollmentError`` naming the failing rank, its site and why, together, instead of one rank raising while the
others wait. Fresh nonces from every rank make a recorded proof useless in another run. Only fixed-length uint8
tensors travel (no pickled objects, which an impostor could use to run code on its peers).

What it does not do: it authenticates the ranks once, at start. Later traffic (gloo's TCP) is neither encrypted
nor authenticated by torch.distributed, so a party on the network path can still read or alter it: run the
federation inside a private network, a WireGuard tunnel or SSH tunnels (docs/federation.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlm.errors import ConfigError, FedlmError
from fedlm.federation.topology import Topology
from fedlm.federation.wire import gather_uint8

SITE_ENV, KEY_ENV = "FEDLM_SITE", "FEDLM_SITE_KEY"  # per-node site and key, when the config leaves them null
ROSTER_VERSION = 1
NONCE_BYTES = DIGEST_BYTES = 32
NAME_BYTES = SIGNATURE_BYTES = 64
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # ASCII, so that it fits NAME_BYTES as it is
DOMAIN = b"fedlm enrollment v1\0"  # a signature made for anything else never verifies here


class EnrollmentError(FedlmError):
    """A key, a roster or a rank's proof of membership that fedlm refuses."""


@dataclass
class EnrollmentConfig:
    """The ``federation.enrollment:`` section (absent or null: any process that joins the launch takes part).

    Args:
        roster: the federation's roster (``fedlm keys roster``), the same file on every node.
        site: the site this process speaks for, a name in the roster; null: the ``FEDLM_SITE`` environment
            variable (one config for every node, each node's site in its own environment).
        key: that site's private identity key (``fedlm keys new``), readable by its owner alone (``chmod 600``);
            null: the ``FEDLM_SITE_KEY`` environment variable.
    """

    roster: str
    site: str | None = None
    key: str | None = None

    def validate(self) -> None:
        if not self.roster:
            raise ConfigError("federation.enrollment.roster is empty: give the roster file (fedlm keys roster).")


# -- names and keys -------------------------------------------------------------------------------------------


def check_site_name(name: str, field: str) -> str:
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise EnrollmentError(
            f"{field}={name!r} is not a site name: use 1 to {NAME_BYTES} ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return name


def fingerprint(public: bytes) -> str:
    """A short hash of a raw public key, for people to compare over a second channel."""
    return hashlib.sha256(public).hexdigest()[:16]


def check_private(path: Path) -> None:
    """A private key that others can read is no longer private: refuse it, as ssh does."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise EnrollmentError(f"site key {path}: cannot read it ({err.strerror}).") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EnrollmentError(
            f"site key {path} is readable by others (mode {stat.S_IMODE(mode):o}): run `chmod 600 {path}` (and "
            "make a new key, if others may have read it)."
        )


@dataclass(frozen=True)
class SiteKey:
    """A site's private identity key: what it signs proves that the roster's site is speaking."""

    site: str
    private: Ed25519PrivateKey

    @classmethod
    def load(cls, site: str, path: str | Path) -> SiteKey:
        path = Path(path)
        check_private(path)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise EnrollmentError(f"site key {path}: not an unencrypted PEM private key ({err}).") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise EnrollmentError(f"site key {path}: not an Ed25519 key; make one with `fedlm keys new`.")
        return cls(check_site_name(site, "site"), private)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` (64 bytes), which ``Roster.verify`` checks against this site's entry."""
        return self.private.sign(message)


# -- the roster -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    public_key: bytes  # raw Ed25519, 32 bytes
    clients: tuple[int, ...]


def fields_of(value: Any, allowed: set[str], where: str, source: str) -> dict[str, Any]:
    """``value`` as a JSON object with exactly the ``allowed`` fields."""
    if not isinstance(value, dict):
        raise EnrollmentError(f"roster {source}: {where} must be a JSON object with fields {sorted(allowed)}.")
    unknown, missing = set(value) - allowed, allowed - set(value)
    if unknown or missing:
        problem = f"unknown field(s) {sorted(unknown)}" if unknown else f"missing field(s) {sorted(missing)}"
        raise EnrollmentError(f"roster {source}: {where} has {problem}; its fields are {sorted(allowed)}.")
    return value


def parse_public_key(text: Any, where: str, source: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
        Ed25519PublicKey.from_public_bytes(raw)
    except (TypeError, ValueError):
        raise EnrollmentError(
            f"roster {source}: {where}.public_key={text!r} is not an Ed25519 public key (64 hex digits); take it "
            "from the site's .pub file with `fedlm keys roster`."
        ) from None
    return raw


def parse_clients(value: Any, where: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise EnrollmentError(f"roster {source}: {where}.clients={value!r} must be a list of client indices.")
    if any(c < 0 for c in value) or len(set(value)) != len(value):
        raise EnrollmentError(f"roster {source}: {where}.clients={value!r} must be distinct indices >= 0.")
    return tuple(sorted(value))


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no field twice (``json`` would keep the last silently: a second site entry)."""
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise EnrollmentError(f"the roster names {twice} twice; each site (and field) once.")
    return dict(pairs)


@dataclass(frozen=True)
class Roster:
    """The federation's members: each site's public key and the clients it hosts. Every node holds the same one."""

    sites: Mapping[str, Site]
    source: str = "roster"

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise EnrollmentError(f"federation.enrollment.roster={path}: cannot read it ({err.strerror}).") from None
        try:
            data = json.loads(text, object_pairs_hook=unique_object)
        except json.JSONDecodeError as err:
            raise EnrollmentError(f"roster {path}: not valid JSON ({err}).") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "roster") -> Roster:
        top = fields_of(data, {"version", "sites"}, "the top level", source)
        if top["version"] != ROSTER_VERSION:
            raise EnrollmentError(f"roster {source}: version={top['version']!r}; this fedlm reads version 1.")
        if not isinstance(top["sites"], dict) or not top["sites"]:
            raise EnrollmentError(f"roster {source}: sites must be a JSON object naming at least one site.")
        sites = {}
        for name, entry in top["sites"].items():
            where = f"sites.{name}"
            check_site_name(name, f"roster {source}: site name")
            entry = fields_of(entry, {"public_key", "clients"}, where, source)
            key = parse_public_key(entry["public_key"], where, source)
            sites[name] = Site(key, parse_clients(entry["clients"], where, source))
        roster = cls(sites, source)
        roster.check_distinct()
        return roster

    def check_distinct(self) -> None:
        """One key per site (a shared key lets one site speak for the other), one site per client."""
        owners: dict[bytes, str] = {}
        hosts: dict[int, str] = {}
        for name, site in self.sites.items():
            if site.public_key in owners:
                raise EnrollmentError(
                    f"roster {self.source}: sites {owners[site.public_key]!r} and {name!r} have the same public_key; "
                    "each site needs its own key (fedlm keys new)."
                )
            owners[site.public_key] = name
            for client in site.clients:
                if client in hosts:
                    raise EnrollmentError(
                        f"roster {self.source}: client {client} is hosted by both {hosts[client]!r} and {name!r}; "
                        "list each client under one site's clients."
                    )
                hosts[client] = name

    def check_clients(self, clients: int) -> None:
        """Every client of a run with ``federation.clients=clients`` hosted by a site, and no other client."""
        hosted = {c for site in self.sites.values() for c in site.clients}
        nobody, extra = sorted(set(range(clients)) - hosted), sorted(hosted - set(range(clients)))
        if nobody:
            raise EnrollmentError(
                f"roster {self.source}: client(s) {nobody} of federation.clients={clients} are hosted by no site; "
                "add them to a site's clients (fedlm keys roster --site NAME=PUB:CLIENTS)."
            )
        if extra:
            raise EnrollmentError(
                f"roster {self.source}: client(s) {extra} are beyond federation.clients={clients} (0 to "
                f"{clients - 1}); remove them from the roster, or raise federation.clients."
            )

    def to_json(self) -> dict[str, Any]:
        sites = {n: {"public_key": s.public_key.hex(), "clients": list(s.clients)} for n, s in self.sites.items()}
        return {"version": ROSTER_VERSION, "sites": sites}

    def digest(self) -> bytes:
        """SHA-256 of the roster's content (not of its file's layout): equal on two nodes iff they list the same."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).digest()

    def verify(self, site: str, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``site``'s signature of ``message`` under the roster's key for it (False for a
        site not in the roster)."""
        entry = self.sites.get(site)
        if entry is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(entry.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


# -- the proof of membership ----------------------------------------------------------------------------------


def gather_bytes(payload: bytes, what: str, group: dist.ProcessGroup | None) -> list[bytes]:
    """Every rank's ``payload`` (the same length on every rank), in rank order; one process: its own."""
    if not (dist.is_available() and dist.is_initialized()):
        return [payload]
    row = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return [received.numpy().tobytes() for received in gather_uint8(row, len(payload), what, group)]


def transcript(challenges: list[bytes], rank: int, site: str) -> bytes:
    """What rank ``rank`` signs: this run (every rank's nonce and roster hash), who it is and whom it speaks for."""
    head = DOMAIN + struct.pack("<II", len(challenges), rank)
    return hashlib.sha256(head + b"".join(challenges) + site.encode()).digest()


def encode_name(site: str) -> bytes:
    return site.encode().ljust(NAME_BYTES, b"\0")


def decode_name(raw: bytes) -> str | None:
    """The site name a rank sent, or None when the bytes are not one (padding other than trailing zeros)."""
    name = raw.rstrip(b"\0")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if SITE_NAME.fullmatch(text) else None


def configured(value: str | None, field: str, env: Mapping[str, str], variable: str, what: str) -> str:
    """``federation.enrollment.<field>``, else the environment variable that stands in for it on each node."""
    value = value or env.get(variable)
    if not value:
        raise ConfigError(f"federation.enrollment.{field} is null and {variable} is unset: give {what} in one of them.")
    return value


@dataclass(frozen=True)
class Membership:
    """What a successful proof established: this run's binding (a hash of every rank's nonce and roster hash) and
    the site each rank speaks for. With the site key it signs later messages (secure aggregation's public keys), so
    that every peer can tell a message comes from the enrolled site of that rank, in this run and for this purpose."""

    key: SiteKey
    roster: Roster
    binding: bytes
    sites: tuple[str, ...]  # by global rank

    def statement(self, purpose: bytes, rank: int, payload: bytes) -> bytes:
        return hashlib.sha256(DOMAIN + purpose + b"\0" + self.binding + struct.pack("<I", rank) + payload).digest()

    def sign(self, purpose: bytes, rank: int, payload: bytes) -> bytes:
        """This rank's signature of ``payload`` for ``purpose`` (64 bytes)."""
        return self.key.sign(self.statement(purpose, rank, payload))

    def verify(self, purpose: bytes, rank: int, payload: bytes, signature: bytes) -> bool:
        """Whether rank ``rank``'s site signed ``payload`` for ``purpose`` in this run."""
        return self.roster.verify(self.sites[rank], self.statement(purpose, rank, payload), signature)


@dataclass(frozen=True)
class Enrollment:
    """This process's site key and the roster: what it needs to prove membership and check everyone else's."""

    key: SiteKey
    roster: Roster

    @classmethod
    def load(cls, config: EnrollmentConfig, clients: int, env: Mapping[str, str] = os.environ) -> Enrollment:
        """From the config, the site and key falling back to ``FEDLM_SITE`` / ``FEDLM_SITE_KEY``; checked before
        any process group forms, so a bad file stops this node alone, at once."""
        site = configured(config.site, "site", env, SITE_ENV, "this process's site, as the roster names it")
        key = configured(config.key, "key", env, KEY_ENV, "its site key file (fedlm keys new)")
        roster = Roster.load(config.roster)
        roster.check_clients(clients)
        return cls(SiteKey.load(site, key), roster)

    def prove(self, topology: Topology, group: dist.ProcessGroup | None = None) -> Membership:
        """The collective proof of membership (every rank calls it once, right after the process group forms):
        returns when every rank is an enrolled site training its own clients, else raises on every rank."""
        challenges = gather_bytes(os.urandom(NONCE_BYTES) + self.roster.digest(), "enrollment: nonces", group)
        signature = self.key.sign(transcript(challenges, topology.rank, self.key.site))
        claims = gather_bytes(encode_name(self.key.site) + signature, "enrollment: sites and signatures", group)
        failures = self._roster_mismatches(challenges) + [
            failure
            for rank, claim in enumerate(claims)
            if (failure := self._check_rank(topology, challenges, rank, claim)) is not None
        ]
        if failures:
            raise EnrollmentError(
                f"enrollment refused (this is rank {topology.rank}, site {self.key.site!r}); no data was exchanged: "
                + "; ".join(failures)
                + ". Each node needs the same roster and its own site's key (federation.enrollment.site and key, or "
                f"{SITE_ENV} and {KEY_ENV})."
            )
        sites = tuple(decode_name(claim[:NAME_BYTES]) or "" for claim in claims)
        return Membership(self.key, self.roster, hashlib.sha256(b"".join(challenges)).digest(), sites)

    def _roster_mismatches(self, challenges: list[bytes]) -> list[str]:
        mine = self.roster.digest()
        return [
            f"rank {rank} holds a different roster (sha256 {theirs.hex()[:16]}, this rank's {mine.hex()[:16]} "
            f"from {self.roster.source})"
            for rank, challenge in enumerate(challenges)
            if (theirs := challenge[NONCE_BYTES:]) != mine
        ]

    def _check_rank(self, topology: Topology, challenges: list[bytes], rank: int, claim: bytes) -> str | None:
        """Why rank ``rank``'s claim fails, or None when it is an enrolled site that hosts the clients it trains."""
        site, signature = decode_name(claim[:NAME_BYTES]), claim[NAME_BYTES:]
        if site is None:
            return f"rank {rank} sent a malformed site name"
        if site not in self.roster.sites:
            return f"rank {rank} claims site {site!r}, which is not in the roster"
        if not self.roster.verify(site, transcript(challenges, rank, site), signature):
            return f"rank {rank} (site {site!r}): bad signature, not made with the key the roster lists for {site!r}"
        trains = replace(topology, rank=rank).hosted_clients
        foreign = sorted(set(trains) - set(self.roster.sites[site].clients))
        if foreign:
            return f"rank {rank} (site {site!r}) trains client(s) {foreign}, which the roster does not give {site!r}"
        return None
