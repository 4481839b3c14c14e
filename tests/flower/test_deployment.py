"""A real Flower deployment on loopback: the README's steps as written, and who may join.

``test_the_readmes_deployment_steps_work_as_written`` takes the bash block of the README's "Scaling out"
section and runs its commands in order (other free ports, a temporary ``FLWR_HOME``): the certificates
from ``fedtrust flower-certs``, the guarded SuperLink, key registration, two SuperNodes, the app and
``flwr run``; then checks the run against a sequential in-process run of the same config. A wrong
command in the README fails it.

``test_only_supernodes_over_tls_with_a_registered_key_join`` uses its own PKI (a CA, the SuperLink's
certificate for 127.0.0.1 and the machine's own address, an unrelated CA) and SuperNode keys: three
SuperNodes must fail to join (one that does not trust the SuperLink's CA, one whose key was never
registered, one speaking plaintext), and a key registration from an address other than the operator's is
refused by ``fedtrust flower-superlink``.

Every Flower process runs in its own process group on free ports and is stopped (SIGTERM, then SIGKILL)
when its test ends, so nothing outlives the tests.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fedtrust  # noqa: E402
from fedtrust.flower.deployment import LINK_PORT, NODE_PORT, README_BEGIN, README_END  # noqa: E402
from fedtrust.runner.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "fedavg-digits.yaml"
ROUNDS = 3
RUN_TIMEOUT = 420  # s for `flwr run --stream`: three rounds, each node starting a fresh ClientApp process per message


# ---------------------------------------------------------------- PKI


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
                 ca: bool, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signer, hashes.SHA256())


def own_address() -> str | None:
    """This machine's IPv4 address on its default route (not loopback), or None where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # TEST-NET-3; no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def make_pki(d: Path, extra: str | None = None) -> None:
    """ca.pem, server.pem + server.key (127.0.0.1, localhost, ``extra``), other-ca.pem, and SuperNode keys
    (OpenSSH EC)."""
    d.mkdir()
    for name in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"fedtrust test {name}", key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                      f"fedtrust test {name}")]),
                            key, ca=True)
        (d / f"{name}.pem").write_bytes(_pem(cert))
        if name == "ca":
            ca_key, ca_cert = key, cert
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    san += [x509.IPAddress(ipaddress.ip_address(extra))] if extra else []
    (d / "server.pem").write_bytes(_pem(_certificate("127.0.0.1", server_key, ca_cert.subject, ca_key, False, san)))
    (d / "server.key").write_bytes(_pem(server_key))
    for node in ("node0", "node1", "rogue"):
        key = ec.generate_private_key(ec.SECP384R1())
        openssh = serialization.PrivateFormat.OpenSSH
        (d / f"{node}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, openssh,
                                                          serialization.NoEncryption()))
        (d / f"{node}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))


# ---------------------------------------------------------------- processes


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every process of a deployment test: its own FLWR_HOME, no telemetry or update check,
    one torch thread (two clients share this machine's cores), this interpreter's scripts first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}


def flower_bin(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert path, f"{name!r} not found: it is installed with flwr"
    return path


class Cluster:
    """Flower processes, each in its own process group with a log file; ``stop`` ends them all."""

    def __init__(self, logs: Path, env: dict[str, str], cwd: Path) -> None:
        self.logs, self.env, self.cwd = logs, env, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir()

    def start(self, name: str, args: list[str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                cwd=self.cwd, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))


@dataclass
class Link:
    """A TLS SuperLink with SuperNode authentication on loopback, and what a test needs to use it.

    ``node_ids`` maps each registered key (``node0``, ``node1``) to the node id
    the SuperLink created for it; ``flwr`` runs the ``flwr`` CLI against the
    link (the ``loopback`` connection in ``FLWR_HOME``).
    """

    pki: Path
    port: int
    cluster: Cluster
    node_ids: dict[str, int]
    node_ports: list[int]
    address: str | None
    """This machine's non-loopback address (the ``remote`` connection), None where it has none."""

    def flwr(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=self.cluster.env, cwd=self.cluster.cwd,
                              capture_output=True, text=True, timeout=timeout)

    def supernode(self, name: str, partition: int, *, ca: str | None = "ca.pem", key: str | None = "node0.key",
                  host: str = "127.0.0.1") -> None:
        """Start a SuperNode; ``ca=None`` starts it in plaintext (``--insecure``), ``key=None`` without a key."""
        transport = ["--insecure"] if ca is None else ["--root-certificates", str(self.pki / ca)]
        auth = [] if key is None else ["--auth-supernode-private-key", str(self.pki / key)]
        self.cluster.start(name, [flower_bin("flower-supernode"), "--superlink", f"{host}:{self.port}",
                                  *transport, *auth, "--node-config", f"partition-id={partition} num-partitions=2",
                                  "--port", str(self.node_ports.pop()), "--max-retries", "1", "--max-wait-time", "20"])

    def nodes(self) -> dict[int, str]:
        """``{node id: status}`` of every node the SuperLink knows (``flwr supernode list``)."""
        listing = self.flwr("supernode", "list", "loopback", "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        return {int(n["node-id"]): n["status"] for n in json.loads(listing.stdout)["nodes"]}


@pytest.fixture
def tls_link(tmp_path: Path) -> Iterator[Link]:
    """A started TLS SuperLink (``--enable-supernode-auth``) with the keys node0 and node1 registered.

    Every Flower process a test starts through it is stopped (SIGTERM, then
    SIGKILL, by process group) when the test ends, passed or not.
    """
    pki = tmp_path / "pki"
    address = own_address()
    make_pki(pki, address)
    link_port, *node_ports = free_ports(5)
    env = flower_env(tmp_path / "flwr-home")
    (tmp_path / "flwr-home").mkdir()
    remote = (f'\n[superlink.remote]\naddress = "{address}:{link_port}"\nroot-certificates = "{pki / "ca.pem"}"\n'
              if address else "")
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{pki / "ca.pem"}"\n{remote}')
    cluster = Cluster(tmp_path / "logs", env, tmp_path)
    link = Link(pki, link_port, cluster, {}, node_ports, address)
    try:
        cluster.start("superlink", [flower_bin("fedtrust"), "flower-superlink", "--host", "0.0.0.0", "--port",
                                    str(link_port),
                                    "--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
                                    "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth",
                                    "--disable-runtime-dependency-installation"])
        wait_for_port(link_port, timeout=90)
        for key in ("node0", "node1"):
            reg = link.flwr("supernode", "register", str(pki / f"{key}.pub"), "loopback")
            created = re.search(r"SuperNode (\d+) registered", reg.stdout)
            assert reg.returncode == 0 and created, reg.stdout + reg.stderr
            link.node_ids[key] = int(created.group(1))
        yield link
    finally:
        cluster.stop()
    assert all(proc.poll() is not None for proc in cluster.procs.values())


def test_only_supernodes_over_tls_with_a_registered_key_join(tls_link):
    """A SuperNode joins the TLS SuperLink only over TLS, trusting its CA, with a key the operator registered.

    Rules out a SuperLink that accepts plaintext connections (a SuperNode
    started with ``--insecure`` would come online as a new node), one whose
    certificate a SuperNode trusting another CA accepts, one that lets an
    unregistered key in, and, through this machine's non-loopback address,
    a Control API that lets a stranger register a key (``fedtrust
    flower-superlink`` refuses it with 403) or a guard that also blocks
    SuperNodes (node0 joins through that address). The plaintext SuperNode
    has no key: Flower's SuperNode itself refuses a key without TLS (exit
    code 303) before it contacts anything, which would prove nothing about
    the SuperLink. The observable is the SuperLink's own node list: after
    the three have given up, the only nodes it knows are the two registered
    ones, and only node0 (started with everything right) is online. On a
    machine without a non-loopback address node0 connects over loopback and
    the stranger's registration is not tried.
    """
    link = tls_link
    if link.address:
        stranger = link.flwr("supernode", "register", str(link.pki / "rogue.pub"), "remote")
        assert stranger.returncode != 0 and "only the operator may use this API" in stranger.stdout + stranger.stderr, (
            stranger.stdout + stranger.stderr)
    link.supernode("supernode0", 0, host=link.address or "127.0.0.1")
    link.supernode("wrong-ca", 0, ca="other-ca.pem")  # the right key, an untrusted server
    link.supernode("rogue", 0, key="rogue.key")  # TLS fine, key never registered
    link.supernode("plaintext", 1, ca=None, key=None)  # no TLS at all

    assert link.cluster.wait("wrong-ca", timeout=90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in link.cluster.log("wrong-ca")
    assert link.cluster.wait("rogue", timeout=90) != 0
    assert "Failed to activate SuperNode" in link.cluster.log("rogue")
    assert link.cluster.wait("plaintext", timeout=90) != 0, link.cluster.log("plaintext")[-2000:]
    assert "Failed to initialize the connection to the SuperLink" in link.cluster.log("plaintext")

    deadline = time.monotonic() + 60
    while (nodes := link.nodes())[link.node_ids["node0"]] != "online" and time.monotonic() < deadline:
        time.sleep(1)
    assert nodes == {link.node_ids["node0"]: "online", link.node_ids["node1"]: "registered"}, (
        f"{nodes}\nsuperlink log:\n{link.cluster.log('superlink')[-3000:]}")
    assert link.cluster.procs["supernode0"].poll() is None, link.cluster.log("supernode0")[-2000:]


def _flat(x: Any, path: str = "") -> dict[str, Any]:
    """A nested metrics record as ``{"group_acc.many": 0.9, "client_acc[1]": 0.4, ...}``."""
    if isinstance(x, dict):
        return {k: v for key, item in x.items() for k, v in _flat(item, f"{path}.{key}" if path else key).items()}
    if isinstance(x, list):
        return {k: v for i, item in enumerate(x) for k, v in _flat(item, f"{path}[{i}]").items()}
    return {path: x}


def readme_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The commands of the README's deployment block, in order: comments and blank lines dropped, ``\\``
    continuations joined, a here-document kept whole with its command."""
    text = readme.read_text()
    begin, end = text.index(README_BEGIN), text.index(README_END)
    block = text[begin:end].split("```bash\n", 1)[1].rsplit("```", 1)[0]
    commands, lines = [], iter(block.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + next(lines).lstrip()
        if "<<" in line:
            marker = line.rsplit("<<", 1)[1].strip().strip("'\"")
            body = []
            for more in lines:
                body.append(more)
                if more.strip() == marker:
                    break
            line = "\n".join([line, *body])
        commands.append(line)
    return commands


def _localized(command: str, ports: dict[int, int]) -> str:
    """The command with the README's ports replaced by this test's free ones."""
    return re.sub(r"\b(" + "|".join(map(str, ports)) + r")\b", lambda m: str(ports[int(m.group(1))]), command)


def test_readme_block_parses_into_the_steps_a_user_runs():
    """The extraction the deployment test relies on: every step's command, whole (a broken join of ``\\``
    lines or a split here-document would run half a command)."""
    commands = readme_commands()
    heads = [c.split()[0] if not c.startswith("cat") else "cat" for c in commands]
    assert heads == ["export", "fedtrust", "mkdir", "cat", "fedtrust", "flwr", "flwr", "flower-supernode",
                     "flower-supernode", "fedtrust", "flwr"]
    assert commands[3].endswith("\nEOF") and "[superlink.my-link]" in commands[3]
    assert "--disable-runtime-dependency-installation &" in commands[4] and "\\" not in commands[4]


def test_the_readmes_deployment_steps_work_as_written(tmp_path, one_thread):
    """The README's block, run command by command in a fresh directory (as a user would from the repository
    root: ``configs/`` is there), gives a deployed run equal to the sequential executor's, metric for metric.

    Background commands (``&``) start as processes; after the SuperLink's the test waits for its port, as a
    user waits for "Application startup complete". ``export`` lines set the environment of later commands,
    as in one shell. Every other command must exit 0. Then: ``flwr run --stream`` showed one line per round;
    every metric of every round (train loss, test accuracy and loss, class, group and per-client accuracies,
    ECE) and the final weights equal an in-process ``executor=sequential`` run of the same config and seed.
    Rules out README steps in the wrong order or with wrong flags, a ServerApp that aggregates differently
    from the in-process executors, a ClientApp on another random stream, and weights that lose precision on
    the wire. Tolerances: every process runs one torch thread and aggregates in client-id order in float64,
    so the runs agree to the bit here; rel 1e-5 / abs 1e-6 only absorbs another BLAS.
    """
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    env = flower_env(tmp_path / "flwr-home")
    link_port, *node_ports = free_ports(3)
    ports = {LINK_PORT: link_port, NODE_PORT: node_ports[0], NODE_PORT + 1: node_ports[1]}
    cluster = Cluster(tmp_path / "logs", env, work)
    outputs: list[str] = []
    try:
        for k, command in enumerate(readme_commands()):
            command = _localized(command, ports)
            if command.startswith("export "):
                for assignment in shlex.split(command)[1:]:
                    name, _, value = assignment.partition("=")
                    env[name] = value
                continue
            if command.endswith("&"):
                cluster.start(f"step{k}", ["bash", "-c", command[:-1]])
                if "flower-superlink" in command:
                    wait_for_port(link_port, timeout=90)
                continue
            done = subprocess.run(["bash", "-c", command], env=env, cwd=work, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT)
            assert done.returncode == 0, (f"README step failed: {command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
                                          + "".join(f"\n--- {name}:\n{cluster.log(name)[-2000:]}"
                                                    for name in cluster.procs))
            outputs.append(done.stdout)
    finally:
        cluster.stop()
    streamed = outputs[-1]
    run_dir = work / "runs" / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["executor"], summary["rounds"]) == ("flower", ROUNDS)
    for r in range(1, ROUNDS + 1):
        assert f"round {r}/{ROUNDS}: 2 of 2 clients replied" in streamed, streamed[-3000:]
    assert f"test_acc {summary['test_acc']:.4f}" in streamed

    overrides = [f"rounds={ROUNDS}", "data.num_clients=2", "data.clients_per_round=2"]
    seq = fedtrust.run(str(CONFIG), [*overrides, "executor=sequential", f"out={tmp_path / 'seq'}"],
                       progress=False, report=False)
    deployed, expected = read_metrics(run_dir), read_metrics(tmp_path / "seq")
    assert [(r["round"], r["clients"]) for r in deployed] == [(r, 2) for r in range(1, ROUNDS + 1)]
    assert expected[-1]["test_acc"] > 0.5  # three rounds on 8x8 digits: the reference itself learned
    for d, e in zip(deployed, expected, strict=True):
        d, e = (_flat({k: v for k, v in r.items() if k != "time_s"}) for r in (d, e))
        assert d == pytest.approx(e, rel=1e-5, abs=1e-6), f"round {e['round']}"
    weights = {k[len("server/"):]: v for k, v in load_file(run_dir / "checkpoint.safetensors").items()
               if k.startswith("server/")}
    assert weights.keys() == seq.state.arrays.keys()
    for k, v in seq.state.arrays.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
