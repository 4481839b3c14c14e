"""A real Flower deployment on loopback: SuperLink + SuperNodes over TLS, FedAvg on digits via `flwr run`.

The tests make their own PKI (a CA, the SuperLink's certificate for 127.0.0.1,
an unrelated CA) and SuperNode keys, start every Flower process in its own
process group on free loopback ports, and stop them all (SIGTERM, then
SIGKILL) when the test ends (the ``tls_link`` fixture), so nothing outlives
them. Three SuperNodes must fail to join: one that does not trust the
SuperLink's CA (TLS), one whose key was never registered (Flower's SuperNode
authentication; Flower's SuperNodes do not present client certificates, their
credential is this key), and one speaking plaintext. Two registered SuperNodes
then run FedAvg, whose metrics and weights must equal the sequential executor's.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
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
from fedtrust.cli import main  # noqa: E402
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


def make_pki(d: Path) -> None:
    """ca.pem, server.pem + server.key (127.0.0.1, localhost), other-ca.pem, and SuperNode keys (OpenSSH EC)."""
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

    def flwr(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=self.cluster.env, cwd=self.cluster.cwd,
                              capture_output=True, text=True, timeout=timeout)

    def supernode(self, name: str, partition: int, *, ca: str | None = "ca.pem", key: str | None = "node0.key") -> None:
        """Start a SuperNode; ``ca=None`` starts it in plaintext (``--insecure``), ``key=None`` without a key."""
        transport = ["--insecure"] if ca is None else ["--root-certificates", str(self.pki / ca)]
        auth = [] if key is None else ["--auth-supernode-private-key", str(self.pki / key)]
        self.cluster.start(name, [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
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
    make_pki(pki)
    link_port, *node_ports = free_ports(5)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}  # two clients share this machine's cores
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{pki / "ca.pem"}"\n')
    cluster = Cluster(tmp_path / "logs", env, tmp_path)
    link = Link(pki, link_port, cluster, {}, node_ports)
    try:
        cluster.start("superlink", [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(link_port),
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
    """A SuperNode joins the TLS SuperLink only over TLS, trusting its CA, with a registered key.

    Rules out a SuperLink that accepts plaintext connections (a SuperNode
    started with ``--insecure`` would come online as a new node), one whose
    certificate a SuperNode trusting another CA accepts, and one that lets an
    unregistered key in. The plaintext SuperNode has no key: Flower's SuperNode
    itself refuses a key without TLS (exit code 303) before it contacts
    anything, which would prove nothing about the SuperLink. The observable is
    the SuperLink's own node list: after the three have given up, the only
    nodes it knows are the two registered ones, and only node0 (started with
    everything right, so the link does admit nodes) is online.
    """
    link = tls_link
    link.supernode("supernode0", 0)
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


def test_fedavg_over_tls_on_a_superlink_and_two_supernodes(tls_link, tmp_path, one_thread):
    """`flwr run` on the SuperLink and two SuperNodes gives the sequential executor's run, metric for metric.

    Every metric of every round (train loss, test accuracy and loss, class,
    group and per-client accuracies, ECE) and the final weights equal an
    in-process ``executor=sequential`` run of the same config and seed. Rules
    out a ServerApp that aggregates differently from the in-process executors
    (other weights, a reply dropped), a ClientApp that trains with another
    random stream than the sequential executor's, and weights that lose
    precision on the wire (float16 would), none of which a check of "three
    rounds ran and test accuracy is above 0.5" sees.

    Tolerances are those of the simulation parity tests: every process runs
    one torch thread and aggregates in client-id order in float64, so the two
    runs agree to the bit here; rel 1e-5 / abs 1e-6 only absorbs another BLAS.
    """
    link = tls_link
    overrides = [f"rounds={ROUNDS}", "data.num_clients=2", "data.clients_per_round=2", "eval.every=1"]
    app, run_dir = tmp_path / "app", tmp_path / "run"
    assert main(["flower-app", str(CONFIG), str(app), *overrides, f"out={run_dir}"]) == 0
    link.supernode("supernode0", 0, key="node0.key")
    link.supernode("supernode1", 1, key="node1.key")

    run = link.flwr("run", str(app), "loopback", "--stream", "--run-config",
                    "flower.join-timeout=120 flower.round-timeout=240", timeout=RUN_TIMEOUT)
    assert (run_dir / "summary.json").is_file(), (
        f"no summary: flwr run said\n{run.stdout[-3000:]}{run.stderr[-2000:]}\n"
        f"superlink log:\n{link.cluster.log('superlink')[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["executor"], summary["rounds"]) == ("flower", ROUNDS)
    assert f"test_acc {summary['test_acc']:.4f}" in run.stdout  # the ServerApp's log reached `flwr run`
    for name in ("supernode0", "supernode1"):
        assert link.cluster.procs[name].poll() is None, link.cluster.log(name)[-2000:]

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
