"""Enrollment: site keys and the roster (``fedlm keys``), and the proof of membership that every rank makes before
any data moves, in one process, as two nodes on loopback and as two sites in network namespaces of their own."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from helpers import TESTS, site_layout, split_data, with_data, worker_env, write_config

from fedlm.cli import cli
from fedlm.cli.keys import keys_main
from fedlm.errors import ConfigError
from fedlm.federation import SecureAggregationConfig, Topology
from fedlm.federation.enrollment import (
    KEY_ENV,
    SITE_ENV,
    Enrollment,
    EnrollmentConfig,
    EnrollmentError,
    Membership,
    Roster,
    SiteKey,
    transcript,
)
from fedlm.federation.secure import PUBLIC_KEY_BYTES, PURPOSE, SecureAggregationError, SecureAggregator

SITES = ("site-a", "site-b")
IMPOSTOR = "mallory"
# what every rank hands to collectives up to the verdict: its nonce and roster hash, then its site name and signature,
# each after announcing its length (fedlm.federation.wire.gather_uint8)
LENGTH = {"name": "all_gather", "tensors": [["torch.int64", [1]]], "objects": []}
PROOF = [
    LENGTH,
    {"name": "all_gather", "tensors": [["torch.uint8", [64]]], "objects": []},
    LENGTH,
    {"name": "all_gather", "tensors": [["torch.uint8", [128]]], "objects": []},
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys of both sites and of an impostor; ``roster.json`` (site-a hosts client 0, site-b client 1) and
    ``forged.json``, the impostor's own roster, which lists its key under site-b's name."""
    folder = tmp_path_factory.mktemp("enrollment")
    for site in (*SITES, IMPOSTOR):
        keys_main(["new", "--site", site, "--out", str(folder / "keys")])
    for roster, site_b in (("roster.json", "site-b"), ("forged.json", IMPOSTOR)):
        sites = ["--site", f"site-a={folder}/keys/site-a.pub:0", "--site", f"site-b={folder}/keys/{site_b}.pub:1"]
        keys_main(["roster", *sites, "--clients", "2", "--out", str(folder / roster)])
    return folder


def key_of(keys: Path, site: str) -> Path:
    return keys / "keys" / f"{site}.key"


# -- keys and roster --------------------------------------------------------------------------------------------


def test_keys_new_writes_a_key_only_its_owner_reads_and_never_overwrites_one(tmp_path: Path) -> None:
    keys_main(["new", "--site", "site-a", "--out", str(tmp_path)])
    private, public = tmp_path / "site-a.key", tmp_path / "site-a.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    written = private.read_bytes()
    with pytest.raises(EnrollmentError, match="never overwrites a key"):
        keys_main(["new", "--site", "site-a", "--out", str(tmp_path)])
    assert private.read_bytes() == written
    key = SiteKey.load("site-a", private)
    public = key.private.public_key().public_bytes_raw().hex()
    roster = Roster.parse({"version": 1, "sites": {"site-a": {"public_key": public, "clients": [0]}}})
    assert roster.verify("site-a", b"message", key.sign(b"message"))
    assert not roster.verify("site-a", b"other message", key.sign(b"message"))
    assert not roster.verify("site-b", b"message", key.sign(b"message"))


def test_a_key_that_others_can_read_is_refused(keys: Path, tmp_path: Path) -> None:
    exposed = tmp_path / "site-a.key"
    shutil.copyfile(key_of(keys, "site-a"), exposed)
    exposed.chmod(0o644)
    with pytest.raises(EnrollmentError, match=f"site key {exposed} is readable by others .*chmod 600 {exposed}"):
        SiteKey.load("site-a", exposed)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: {**r, "owner": "x"}, r"the top level has unknown field\(s\) \['owner'\]"),
        (lambda r: {**r, "version": 2}, "version=2; this fedlm reads version 1"),
        (
            lambda r: {**r, "sites": {**r["sites"], "site-b": {**r["sites"]["site-b"], "key": "00"}}},
            r"sites.site-b has unknown field\(s\) \['key'\]",
        ),
        (
            lambda r: {**r, "sites": {**r["sites"], "site-b": {**r["sites"]["site-b"], "public_key": "zz"}}},
            "sites.site-b.public_key='zz' is not an Ed25519 public key",
        ),
        (
            lambda r: {**r, "sites": {**r["sites"], "site-b": {**r["sites"]["site-b"], "clients": [0]}}},
            "client 0 is hosted by both 'site-a' and 'site-b'",
        ),
        (
            lambda r: {**r, "sites": {**r["sites"], "site-b": r["sites"]["site-a"]}},
            "sites 'site-a' and 'site-b' have the same public_key",
        ),
        (lambda r: {**r, "sites": {"a b": r["sites"]["site-a"]}}, "site name='a b' is not a site name"),
    ],
    ids=["unknown-field", "version", "unknown-site-field", "bad-key", "client-twice", "shared-key", "bad-name"],
)
def test_a_bad_roster_is_refused_naming_the_field(keys: Path, tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "roster.json"
    path.write_text(json.dumps(edit(json.loads((keys / "roster.json").read_text()))))
    with pytest.raises(EnrollmentError, match=message):
        Roster.load(path)


def test_a_roster_naming_a_site_twice_or_missing_a_client_is_refused(keys: Path, tmp_path: Path) -> None:
    text = (keys / "roster.json").read_text()
    twice = tmp_path / "twice.json"
    twice.write_text(text.replace('"site-b"', '"site-a"'))
    with pytest.raises(EnrollmentError, match=r"names \['site-a'\] twice"):
        Roster.load(twice)
    roster = Roster.load(keys / "roster.json")
    with pytest.raises(EnrollmentError, match=r"client\(s\) \[2\] of federation.clients=3 are hosted by no site"):
        roster.check_clients(3)
    with pytest.raises(EnrollmentError, match=r"client\(s\) \[1\] are beyond federation.clients=1"):
        roster.check_clients(1)
    pub = f"{keys}/keys/site-a.pub"
    with pytest.raises(EnrollmentError, match=r"--site names \['site-a'\] more than once"):
        keys_main(["roster", "--site", f"site-a={pub}:0", "--site", f"site-a={pub}:1", "--out", str(tmp_path / "r")])
    with pytest.raises(EnrollmentError, match="exists; pass --force"):
        keys_main(["roster", "--site", f"site-a={pub}:0", "--out", str(keys / "roster.json")])


def test_site_and_key_come_from_the_config_or_the_environment(keys: Path) -> None:
    config = EnrollmentConfig(roster=str(keys / "roster.json"))
    with pytest.raises(ConfigError, match=f"federation.enrollment.site is null and {SITE_ENV} is unset"):
        Enrollment.load(config, 2, env={})
    with pytest.raises(ConfigError, match=f"federation.enrollment.key is null and {KEY_ENV} is unset"):
        Enrollment.load(config, 2, env={SITE_ENV: "site-a"})
    loaded = Enrollment.load(config, 2, env={SITE_ENV: "site-a", KEY_ENV: str(key_of(keys, "site-a"))})
    assert loaded.key.site == "site-a"
    with pytest.raises(EnrollmentError, match=r"client\(s\) \[2\] of federation.clients=3"):
        Enrollment.load(config, 3, env={SITE_ENV: "site-a", KEY_ENV: str(key_of(keys, "site-a"))})


def test_one_process_proves_its_own_key_and_clients(keys: Path) -> None:
    """Without a process group the proof checks this process alone: the roster's key, and all the clients."""
    roster = Roster.load(keys / "roster.json")
    alone = Topology(num_clients=2, world_size=1, rank=0)
    with pytest.raises(EnrollmentError, match=r"rank 0 \(site 'site-a'\) trains client\(s\) \[1\], which the roster"):
        Enrollment(SiteKey.load("site-a", key_of(keys, "site-a")), roster).prove(alone)
    with pytest.raises(EnrollmentError, match=r"rank 0 \(site 'site-b'\): bad signature"):
        Enrollment(SiteKey.load("site-b", key_of(keys, IMPOSTOR)), roster).prove(alone)
    with pytest.raises(EnrollmentError, match="rank 0 claims site 'mallory', which is not in the roster"):
        Enrollment(SiteKey.load(IMPOSTOR, key_of(keys, IMPOSTOR)), roster).prove(alone)
    one_site = Roster.parse(
        {"version": 1, "sites": {"site-a": {**roster.to_json()["sites"]["site-a"], "clients": [0, 1]}}}
    )
    Enrollment(SiteKey.load("site-a", key_of(keys, "site-a")), one_site).prove(alone)


def test_fedlm_fit_in_one_process_proves_before_training(
    keys: Path, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``federation.enrollment`` section as the CLI parses it: one process simulates both clients, but site-a
    hosts only client 0, so the run stops before its first round."""
    federation = {**FEDERATION, "enrollment": {"roster": str(keys / "roster.json"), "site": "site-a"}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation)
    monkeypatch.setenv(KEY_ENV, str(key_of(keys, "site-a")))
    with pytest.raises(EnrollmentError, match=r"rank 0 \(site 'site-a'\) trains client\(s\) \[1\]"):
        cli(["fit", "--config", str(config)])


def test_a_signature_holds_for_its_own_run_rank_and_site_only(keys: Path) -> None:
    roster, key = Roster.load(keys / "roster.json"), SiteKey.load("site-a", key_of(keys, "site-a"))
    challenges = [bytes(64), bytes([1]) * 64]
    signature = key.sign(transcript(challenges, 0, "site-a"))
    assert roster.verify("site-a", transcript(challenges, 0, "site-a"), signature)
    for other in (transcript(challenges[::-1], 0, "site-a"), transcript(challenges, 1, "site-a"),
                  transcript(challenges[:1], 0, "site-a")):  # fmt: skip
        assert not roster.verify("site-a", other, signature)


def test_secure_aggregation_refuses_a_public_key_its_site_did_not_sign(keys: Path) -> None:
    roster = Roster.load(keys / "roster.json")
    site_keys = [SiteKey.load(site, key_of(keys, site)) for site in SITES]
    members = [Membership(key, roster, bytes(32), SITES) for key in site_keys]
    publics = [X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in SITES]
    rows = [public + member.sign(PURPOSE, rank, public) for rank, (public, member) in enumerate(zip(publics, members))]
    aggregator = SecureAggregator(SecureAggregationConfig(enabled=True))
    aggregator._check_signatures(members[0], rows)  # as signed: accepted
    substituted = X25519PrivateKey.generate().public_key().public_bytes_raw() + rows[1][PUBLIC_KEY_BYTES:]
    with pytest.raises(SecureAggregationError, match=r"public key of rank 1 \(site 'site-b'\) is not signed"):
        aggregator._check_signatures(members[0], [rows[0], substituted])
    other_run = Membership(site_keys[1], roster, bytes([1]) * 32, SITES)  # a signature replayed from another run
    replayed = publics[1] + other_run.sign(PURPOSE, 1, publics[1])
    with pytest.raises(SecureAggregationError, match="rank 1"):
        aggregator._check_signatures(members[0], [rows[0], replayed])


# -- two nodes: on loopback, and in network namespaces ------------------------------------------------------------

# secure aggregation on: its X25519 public keys travel signed by the site keys, and are checked
FEDERATION = {"clients": 2, "rounds": 1, "local_steps": 1, "seed": 5, "collective_timeout_s": 60,
              "secure_aggregation": {"enabled": True}}  # fmt: skip
RUN_TIMEOUT_S = 300


@dataclass
class Node:
    """One node of a 2-node launch: its rank, the site it speaks for with which key, and its network namespace."""

    rank: int
    site: str
    key: str
    roster: str = "roster.json"
    netns: str | None = None  # None: this machine's own network


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(folder: Path, backbone: str, fpb: Path, data: Path, roster: Path) -> Path:
    """A tiny 1-round fit on this node's own data files, enrollment on (site and key from the environment)."""
    config = write_config(folder, backbone, fpb, {**FEDERATION, "enrollment": {"roster": str(roster)}})
    return with_data(config, client_files=[str(data / "site0.txt"), str(data / "site1.txt")],
                     val_file=str(data / "val.txt"), test_file=str(data / "test.txt"))  # fmt: skip


def launch(node: Node, folder: Path, config: Path, keys: Path, master: str, port: int) -> subprocess.Popen:
    """torchrun of node ``node.rank`` of 2 (static rendezvous: node k is rank k) running tests/enrollment_worker.py."""
    prefix = ["ip", "netns", "exec", node.netns] if node.netns else []
    command = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node.rank}", f"--master_addr={master}", f"--master_port={port}",
               str(TESTS / "enrollment_worker.py"), str(folder), "fit", "--config", str(config)]  # fmt: skip
    env = worker_env(**{SITE_ENV: node.site, KEY_ENV: str(key_of(keys, node.key))})
    if node.netns:
        env["GLOO_SOCKET_IFNAME"] = LINK  # the namespace's link to the other sites: gloo's address
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """End a node still running: SIGTERM makes torchrun stop its worker too; SIGKILL if that takes too long."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def run_nodes(
    nodes: list[Node], keys: Path, tmp_path: Path, backbone: str, fpb: Path, master: str, port: int
) -> list[tuple[int, str, list[dict]]]:
    """Each node on its own copy of its site's files, to its end (at most ``RUN_TIMEOUT_S``): its exit code,
    stderr and the collectives it called."""
    split = split_data(fpb, tmp_path / "split")
    processes: list[subprocess.Popen] = []
    try:
        for node in nodes:
            folder = tmp_path / f"node{node.rank}"
            data = site_layout(split, folder / "data", node.rank)
            config = node_config(folder, backbone, fpb, data, keys / node.roster)
            processes.append(launch(node, folder, config, keys, master, port))
        ended = [(process.communicate(timeout=RUN_TIMEOUT_S)[1], process.returncode) for process in processes]
    finally:
        for process in processes:
            stop(process)
    results = []
    for node, (stderr, code) in zip(nodes, ended, strict=True):
        called = tmp_path / f"node{node.rank}" / f"collectives-rank{node.rank}.json"
        results.append((code, stderr, json.loads(called.read_text()) if called.is_file() else []))
    return results


SCENARIOS = {
    "enrolled": [Node(0, "site-a", "site-a"), Node(1, "site-b", "site-b")],
    "unknown_key": [Node(0, "site-a", "site-a"), Node(1, "site-b", IMPOSTOR)],
    "forged_roster": [Node(0, "site-a", "site-a"), Node(1, "site-b", IMPOSTOR, roster="forged.json")],
}
# what the honest rank 0 says of rank 1, and what rank 1 says, by scenario
REFUSALS = {
    "unknown_key": ["rank 1 (site 'site-b'): bad signature, not made with the key the roster lists for 'site-b'",
                    "rank 1 (site 'site-b'): bad signature"],
    "forged_roster": ["rank 1 holds a different roster", "rank 0 holds a different roster"],
}  # fmt: skip


def check_outcome(scenario: str, results: list[tuple[int, str, list[dict]]]) -> None:
    """Enrolled: both train, the proof first. Otherwise every rank stops with the reason, and the proof's uint8
    all-gathers are all that any rank ever handed to a collective: no tensor derived from data moved."""
    for rank, (code, stderr, called) in enumerate(results):
        if scenario == "enrolled":
            assert code == 0, stderr[-3000:]
            assert called[: len(PROOF)] == PROOF and any(c["name"] == "all_reduce" for c in called[len(PROOF) :])
            continue
        assert code != 0
        assert "fedlm: error: enrollment refused" in stderr and REFUSALS[scenario][rank] in stderr, stderr[-3000:]
        assert called == PROOF


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_nodes_on_loopback_take_part_only_when_enrolled(
    scenario: str, keys: Path, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    if netns_unavailable() is None:
        pytest.skip("the network-namespace test runs these scenarios across real links (one run proves both)")
    results = run_nodes(SCENARIOS[scenario], keys, tmp_path, tiny_gpt2_dir, synthetic_fpb, "127.0.0.1", free_port())
    check_outcome(scenario, results)


# -- network namespaces: each site its own address, the impostor a third -------------------------------------------

SUBNET = "10.231.86"  # private, and only ever inside the namespaces made here
LINK = "fl0"  # each site's interface, inside its namespace
ROLES = {"a": 1, "b": 2, "m": 3}  # site-a, site-b and the impostor: the last byte of each one's address


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"fedlm-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        return f"`ip netns add` failed: {getattr(err, 'stderr', '') or err}"
    ip("netns", "del", probe)
    return None


@pytest.fixture(scope="module")
def sites_network() -> Iterator[dict[str, str]]:
    """A namespace per party, each with one link to a bridge in a switch namespace: site-a at .1, site-b at .2,
    the impostor at .3 of ``SUBNET``/24. Nothing is added to this machine's own network; deleting the namespaces
    deletes the links. Maps each role to its namespace."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"fedlm-{os.getpid()}"
    switch, namespaces = f"{prefix}-sw", {role: f"{prefix}-{role}" for role in ROLES}
    made = []
    try:
        for name in (switch, *namespaces.values()):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for role, host in ROLES.items():
            port = f"p{role}"
            ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", LINK, "netns", namespaces[role])
            ip("-n", switch, "link", "set", port, "master", "br0", "up")
            ip("-n", namespaces[role], "addr", "add", f"{SUBNET}.{host}/24", "dev", LINK)
            ip("-n", namespaces[role], "link", "set", LINK, "up")
        yield namespaces
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sites_in_their_own_network_namespaces_take_part_only_when_enrolled(
    scenario: str, sites_network: dict[str, str], keys: Path, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """site-a (node 0) and site-b (node 1) each in a namespace of its own, talking over the bridge; in the refused
    scenarios the impostor's namespace takes site-b's place."""
    role = {"site-a": "a", "site-b": "b", IMPOSTOR: "m"}  # by the key a node holds
    nodes = [replace(node, netns=sites_network[role[node.key]]) for node in SCENARIOS[scenario]]
    port = 29500 + list(SCENARIOS).index(scenario)  # a fresh port per run: the namespaces are the module's
    results = run_nodes(nodes, keys, tmp_path, tiny_gpt2_dir, synthetic_fpb, f"{SUBNET}.{ROLES['a']}", port)
    check_outcome(scenario, results)
