"""`fedtrust flower-certs`: the CA, the SuperLink certificate (always valid for 127.0.0.1) and SuperNode keys."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="cryptography not installed: pip install 'fedtrust[flower]'")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from fedtrust.cli import main  # noqa: E402
from fedtrust.errors import FedTrustError  # noqa: E402
from fedtrust.flower.certs import write_certificates  # noqa: E402

HOSTS = ["203.0.113.7", "SuperLink.Example.org"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    """One set of files for HOSTS with three nodes (generating keys is the slow part)."""
    return write_certificates(tmp_path_factory.mktemp("certs") / "new", HOSTS, nodes=3, days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(certs, server_hostname: str) -> None:
    """A TLS handshake with an ``ssl`` server on 127.0.0.1 serving server.pem, as a client trusting only ca.pem."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13: needs key identifiers
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):  # the client rejected the certificate
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                with client_ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
                    assert tls.version() is not None
        finally:
            thread.join(timeout=10)


def test_server_certificate_names_every_host_and_always_loopback(certs):
    """Rules out a certificate naming only the given hosts (the SuperExec on 127.0.0.1 then dies), IPs written
    as DNS names (clients check IP addresses only against IPAddress SANs) and names as IPs or unnormalised."""
    san = _cert(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = set(san.get_values_for_type(x509.IPAddress))
    dns = set(san.get_values_for_type(x509.DNSName))
    assert ips == {ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert dns == {"superlink.example.org", "localhost"}
    assert certs.server_names == ("203.0.113.7", "superlink.example.org", "127.0.0.1", "::1", "localhost")


def test_loopback_hosts_given_by_the_user_are_not_repeated(tmp_path):
    """Rules out appending 127.0.0.1/localhost blindly (duplicate SANs) and not normalising ``::0001``."""
    files = write_certificates(tmp_path / "c", ["127.0.0.1", "LOCALHOST", "0:0:0:0:0:0:0:1"], nodes=0)
    san = _cert(files.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 3 and files.server_names == ("127.0.0.1", "localhost", "::1")


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_tls_client_trusting_the_ca_accepts_the_server_at_loopback(certs, name):
    """The SuperExec's own connection: rules out a server certificate not signed by ca.pem (e.g. self-signed or
    signed by a second, unsaved key), a key file not matching server.pem, and a certificate without loopback."""
    _handshake(certs, name)


def test_tls_client_rejects_a_name_the_certificate_does_not_cover(certs):
    """Rules out a wildcard or name-less certificate that would also pass for any other host."""
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "other.example.org")


def test_ca_is_a_ca_and_the_server_certificate_is_a_tls_server_certificate(certs):
    """Rules out a CA without CA=true/keyCertSign (verification fails) and a server certificate that could sign
    other certificates or lacks serverAuth."""
    ca, server = _cert(certs.ca_cert), _cert(certs.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.issuer == ca.subject and server.serial_number != ca.serial_number


def test_validity_starts_just_before_now_and_lasts_days(certs):
    """Rules out certificates valid only from 'now' (clock skew rejects them) or ignoring ``days``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    for path in (certs.ca_cert, certs.server_cert):
        cert = _cert(path)
        assert now - datetime.timedelta(minutes=5) < cert.not_valid_before_utc < now
        assert abs(cert.not_valid_after_utc - (now + datetime.timedelta(days=30))) < datetime.timedelta(minutes=5)


def test_private_keys_are_owner_only_and_public_files_readable(certs):
    """Rules out private keys written with the umask's default (world-readable) mode."""
    for path in (certs.ca_key, certs.server_key, *certs.node_keys):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (certs.ca_cert, certs.server_cert, *certs.node_public_keys):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044, path
    assert stat.S_IMODE(certs.ca_cert.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in certs.ca_cert.parent.iterdir()) == sorted(p.name for p in certs.paths())


def test_node_keys_are_openssh_ec_pairs_that_flower_loads(certs):
    """Flower loads ``node{k}`` with ``load_ssh_private_key`` and needs an EC key, and registers ``node{k}.pub``
    with ``load_ssh_public_key``: rules out PEM/PKCS8 keys, Ed25519/RSA keys, a .pub from another key, and nodes
    sharing one key."""
    assert [p.name for p in certs.node_keys] == ["node0", "node1", "node2"]
    publics = set()
    for key_path, pub_path in zip(certs.node_keys, certs.node_public_keys):
        assert pub_path.name == key_path.name + ".pub"
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert pub.public_numbers() == key.public_key().public_numbers()
        publics.add(pub_path.read_bytes().split()[1])
    assert len(publics) == 3


def test_existing_file_is_not_overwritten(tmp_path):
    """Rules out silently replacing a CA (every node would have to be re-provisioned) or writing the rest."""
    (tmp_path / "server.key").write_text("keep me")
    with pytest.raises(FedTrustError, match=r"server\.key.*already exists.*empty directory"):
        write_certificates(tmp_path, ["10.0.0.1"])
    assert (tmp_path / "server.key").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]


@pytest.mark.parametrize("hosts, message", [
    (["10.0.0.1:8000"], "without a port"),
    (["superlink.example.org:9092"], "without a port"),
    (["https://superlink.example.org"], "without a port"),
    (["super link"], "neither an IP address nor a DNS name"),
    (["10.0.0.300"], "neither an IP address nor a DNS name"),
    ([], "at least one --host"),
])
def test_bad_hosts_are_one_line_errors_before_anything_is_written(tmp_path, hosts, message):
    """Rules out passing ``host:port`` or a typo into a DNS SAN (the certificate then matches nothing)."""
    with pytest.raises(FedTrustError, match=message):
        write_certificates(tmp_path / "c", hosts)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kwargs, message", [(dict(nodes=-1), "--nodes"), (dict(days=0), "--days")])
def test_bad_counts_are_one_line_errors(tmp_path, kwargs, message):
    """Rules out a certificate already expired (days=0) and a silently empty node list (nodes=-1)."""
    with pytest.raises(FedTrustError, match=message):
        write_certificates(tmp_path / "c", ["10.0.0.1"], **kwargs)


def test_missing_cryptography_is_a_one_line_error(tmp_path, monkeypatch):
    """Rules out importing cryptography at module level or letting an ImportError traceback through."""
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(FedTrustError, match="pip install cryptography"):
        write_certificates(tmp_path / "c", ["10.0.0.1"])


def test_cli_writes_files_and_names_what_the_certificate_covers(tmp_path, capsys):
    """Rules out a CLI that drops repeated --host options or --nodes, or does not print the covered names."""
    out = tmp_path / "certs"
    assert main(["flower-certs", str(out), "--host", "10.0.0.5", "--host", "sl.example.org", "--nodes", "1",
                 "--days", "2"]) == 0
    printed = capsys.readouterr().out
    assert "10.0.0.5, sl.example.org, 127.0.0.1, ::1, localhost" in printed
    assert sorted(p.name for p in out.iterdir()) == ["ca.key", "ca.pem", "node0", "node0.pub", "server.key",
                                                     "server.pem"]
    cert = _cert(out / "server.pem")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=2, minutes=2)


@pytest.mark.parametrize("argv, message", [
    (["--host", "10.0.0.1:8000"], "give the address without a port"),
    (["--host", "10.0.0.1", "--nodes", "-1"], "--nodes must be 0 or more"),
])
def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    """Rules out errors escaping ``main`` as tracebacks or exiting 0."""
    assert main(["flower-certs", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_refuses_existing_files_with_status_2(tmp_path, capsys):
    """Rules out the CLI overwriting a CA from an earlier run."""
    (tmp_path / "ca.pem").write_text("old CA")
    assert main(["flower-certs", str(tmp_path), "--host", "10.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ca.pem" in err and "already exists" in err
    assert (tmp_path / "ca.pem").read_text() == "old CA"


def test_cli_empty_host_is_an_error(tmp_path, capsys):
    """Rules out ``--host ''`` slipping through as an empty DNS name."""
    assert main(["flower-certs", str(tmp_path / "c"), "--host", ""]) == 2
    assert capsys.readouterr().err.startswith("error: --host ''")


def test_cli_without_host_is_a_usage_error(tmp_path, capsys):
    """Rules out a default host (e.g. only 127.0.0.1) that SuperNodes on other machines could not verify."""
    with pytest.raises(SystemExit) as exit_info:
        main(["flower-certs", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and "--host" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
