"""A real Flower deployment on loopback: SuperLink + two SuperNodes over TLS, FedAvg on digits via `flwr run`.

The test makes its own PKI (a CA, the SuperLink's certificate for 127.0.0.1,
an unrelated CA) and SuperNode keys, starts every Flower process in its own
process group on free loopback ports, and stops them all (SIGTERM, then
SIGKILL) in a ``finally``, so nothing outlives it. Two SuperNodes must fail to
join: one that does not trust the SuperLink's CA (TLS) and one whose key was
never registered (Flower's SuperNode authentication; Flower's SuperNodes do
not present client certificates, their credential is this key).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from fedtrust.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
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


def test_fedavg_over_tls_on_a_superlink_and_two_supernodes(tmp_path):
    pki = tmp_path / "pki"
    make_pki(pki)
    link_port, *node_ports = free_ports(5)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}  # two clients share this machine's cores
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{pki / "ca.pem"}"\n')
    app, run_dir = tmp_path / "app", tmp_path / "run"
    assert main(["flower-app", str(REPO / "configs" / "fedavg-digits.yaml"), str(app), f"rounds={ROUNDS}",
                 "data.num_clients=2", "data.clients_per_round=2", "eval.every=1", f"out={run_dir}"]) == 0

    cluster = Cluster(tmp_path / "logs", env, tmp_path)
    try:
        cluster.start("superlink", [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(link_port),
                                    "--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
                                    "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth",
                                    "--disable-runtime-dependency-installation"])
        wait_for_port(link_port, timeout=90)
        for k in (0, 1):
            reg = subprocess.run([flower_bin("flwr"), "supernode", "register", str(pki / f"node{k}.pub"), "loopback"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
            assert reg.returncode == 0, reg.stdout + reg.stderr

        def supernode(name: str, port: int, ca: str, key: str, partition: int) -> None:
            cluster.start(name, [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                                 "--root-certificates", str(pki / ca), "--auth-supernode-private-key", str(pki / key),
                                 "--node-config", f"partition-id={partition} num-partitions=2",
                                 "--port", str(port), "--max-retries", "1", "--max-wait-time", "20"])

        supernode("supernode0", node_ports[0], "ca.pem", "node0.key", 0)
        supernode("supernode1", node_ports[1], "ca.pem", "node1.key", 1)
        supernode("wrong-ca", node_ports[2], "other-ca.pem", "node0.key", 0)  # the right key, an untrusted server
        supernode("rogue", node_ports[3], "ca.pem", "rogue.key", 0)  # TLS fine, key never registered

        assert cluster.wait("wrong-ca", timeout=90) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in cluster.log("wrong-ca")
        assert cluster.wait("rogue", timeout=90) != 0
        assert "Failed to activate SuperNode" in cluster.log("rogue")

        run = subprocess.run([flower_bin("flwr"), "run", str(app), "loopback", "--stream", "--run-config",
                              "flower.join-timeout=120 flower.round-timeout=240"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert (run_dir / "summary.json").is_file(), (
            f"no summary: flwr run said\n{run.stdout[-3000:]}{run.stderr[-2000:]}\n"
            f"superlink log:\n{cluster.log('superlink')[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["executor"], summary["rounds"]) == ("flower", ROUNDS)
        assert summary["test_acc"] > 0.5, summary
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in records] == [(r, 2) for r in range(1, ROUNDS + 1)]
        assert f"test_acc {summary['test_acc']:.4f}" in run.stdout  # the ServerApp's log reached `flwr run`
        for name in ("supernode0", "supernode1"):
            assert cluster.procs[name].poll() is None, cluster.log(name)[-2000:]
    finally:
        cluster.stop()
    assert all(proc.poll() is not None for proc in cluster.procs.values())
