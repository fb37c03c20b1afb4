"""``fedlm keys``: the identity keys of the sites and the federation's roster (``federation.enrollment``).

fedlm keys new --site NAME --out DIR
    DIR/NAME.key: the site's private Ed25519 key (PEM, mode 600, never overwritten); keep it on that site's
    nodes only. DIR/NAME.pub: its public key (PEM), to send to whoever builds the roster.
fedlm keys roster --site NAME=PUBFILE:CLIENTS [--site ...] [--clients N] --out roster.json
    the roster: each site's public key and the clients it hosts (CLIENTS: ``0`` or ``0,1``); with
    ``--clients``, checked to host each of a run's N clients once. Every node gets the same file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlm.checkpointing import atomic_write
from fedlm.federation.enrollment import EnrollmentError, Roster, check_site_name, fingerprint


def write_new(path: Path, content: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (whatever the umask) and ``content``; never replace an existing file."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise EnrollmentError(f"{path} exists: fedlm keys new never overwrites a key; move it away first.") from None
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def new_key(site: str, folder: Path) -> tuple[Path, Path]:
    """A fresh identity key for ``site``: ``folder/site.key`` (private, 600) and ``folder/site.pub``."""
    check_site_name(site, "--site")
    key_file, public_file = folder / f"{site}.key", folder / f"{site}.pub"
    existing = [str(path) for path in (key_file, public_file) if path.exists()]
    if existing:
        raise EnrollmentError(f"{', '.join(existing)} exist(s): fedlm keys new never overwrites a key; move it away.")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_new(key_file, pem, 0o600)
    write_new(public_file, public, 0o644)
    return key_file, public_file


def read_public(path: Path) -> bytes:
    """The raw Ed25519 public key in a ``.pub`` file that ``fedlm keys new`` wrote."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise EnrollmentError(f"{path}: not a PEM public key ({err}); give the .pub of fedlm keys new.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollmentError(f"{path}: not an Ed25519 public key; give the .pub that fedlm keys new wrote.")
    return key.public_bytes_raw()


def site_entry(text: str) -> tuple[str, Path, list[int]]:
    """``--site NAME=PUBFILE:CLIENTS`` (the last ``:`` ends the file, so paths may hold one)."""
    name, equals, rest = text.partition("=")
    public, colon, clients = rest.rpartition(":")
    try:
        indices = [int(client) for client in clients.split(",")]
    except ValueError:
        indices = []
    if not (equals and colon and name and public and indices):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=PUBFILE:CLIENTS, e.g. site-a=keys/site-a.pub:0 or site-b=keys/site-b.pub:1,2"
        )
    return name, Path(public), indices


def build_roster(entries: list[tuple[str, Path, list[int]]], clients: int | None) -> Roster:
    """The roster of ``--site`` entries, validated as a run validates it (and against ``--clients``, if given)."""
    names = [name for name, _, _ in entries]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise EnrollmentError(f"--site names {twice} more than once; give each site once, with all its clients.")
    sites = {name: {"public_key": read_public(path).hex(), "clients": hosted} for name, path, hosted in entries}
    roster = Roster.parse({"version": 1, "sites": sites}, "built from --site")
    if clients is not None:
        roster.check_clients(clients)
    return roster


def new_main(args: argparse.Namespace) -> None:
    key_file, public_file = new_key(args.site, args.out)
    print(
        f"[fedlm keys] {key_file}: {args.site}'s private key (mode 600): keep it on {args.site}'s nodes only.\n"
        f"[fedlm keys] {public_file}: its public key, fingerprint {fingerprint(read_public(public_file))}: send it "
        "to whoever builds the roster (fedlm keys roster), and confirm the fingerprint with them."
    )


def roster_main(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.force:
        raise EnrollmentError(f"--out {args.out} exists; pass --force to replace it.")
    roster = build_roster(args.site, args.clients)
    atomic_write(args.out, lambda file: file.write((json.dumps(roster.to_json(), indent=2) + "\n").encode()))
    for name, site in roster.sites.items():
        print(f"[fedlm keys] {name}: clients {list(site.clients)}, key fingerprint {fingerprint(site.public_key)}")
    print(f"[fedlm keys] {args.out}: give every node this same file, as federation.enrollment.roster.")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="fedlm keys", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="a site's identity key pair")
    new.add_argument("--site", required=True, help="the site's name, as the roster will list it")
    new.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for NAME.key and NAME.pub")
    new.set_defaults(run=new_main)
    roster = commands.add_parser("roster", help="the federation's roster of sites")
    roster.add_argument(
        "--site", type=site_entry, action="append", required=True, metavar="NAME=PUBFILE:CLIENTS",
        help="a site, its .pub file and the clients it hosts (e.g. site-a=keys/site-a.pub:0,1); once per site",
    )  # fmt: skip
    roster.add_argument("--clients", type=int, help="the run's federation.clients: each hosted by exactly one site")
    roster.add_argument("--out", type=Path, required=True, metavar="FILE", help="the roster to write (JSON)")
    roster.add_argument("--force", action="store_true", help="replace an existing roster file")
    roster.set_defaults(run=roster_main)
    return main


def keys_main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)
