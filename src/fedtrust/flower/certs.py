"""Certificates and keys for a Flower deployment (``fedtrust flower-certs``).

A TLS deployment needs a CA, a SuperLink certificate signed by it, and one
authentication key pair per SuperNode. :func:`write_certificates` writes them
all into one new directory with the ``cryptography`` package (a Flower
dependency), EC keys throughout.

The SuperLink certificate always names ``127.0.0.1``, ``::1`` and
``localhost`` besides the given hosts: in Flower 1.42 the SuperLink starts a
helper (SuperExec) that connects to ``127.0.0.1:<port>`` and checks the
certificate against the CA. A certificate naming only the public address makes
the helper die with ``CERTIFICATE_VERIFY_FAILED ... not valid for
'127.0.0.1'`` while the SuperLink keeps running and runs never start.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrust.errors import ConfigError, FedTrustError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
"""Names the SuperLink certificate covers whatever the hosts: its own SuperExec connects to 127.0.0.1."""
CA_NAME = "fedtrust Flower CA"
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertFiles:
    """The files :func:`write_certificates` wrote, and the names the SuperLink certificate covers."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    server_names: tuple[str, ...]

    def paths(self) -> list[Path]:
        """Every file written, CA first, then the SuperLink's, then node0, node0.pub, node1, ..."""
        nodes = [p for pair in zip(self.node_keys, self.node_public_keys) for p in pair]
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, *nodes]


def server_names(hosts: Sequence[str]) -> tuple[str, ...]:
    """The hosts (checked, normalised) then 127.0.0.1, ::1 and localhost, without repeats.

    Raises a one-line :class:`ConfigError` for an empty list or a host that is
    neither an IP address nor a DNS name (with a port, spaces, a scheme, ...).
    """
    if not hosts:
        raise ConfigError("give at least one --host: the address SuperNodes and `flwr` use to reach the SuperLink")
    names: list[str] = []
    for host in [*hosts, *LOOPBACK]:
        name = _check_host(host)
        if name not in names:
            names.append(name)
    return tuple(names)


def _check_host(host: str) -> str:
    """``host`` as an IP address (compressed form) or a lower-case DNS name; else a one-line error."""
    text = host.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if name and len(name) <= 253 and all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit():
        return name
    if ":" in text or text.startswith("["):
        hint = "give the address without a port, scheme or brackets (e.g. 10.0.0.5 or superlink.example.org)"
    else:
        hint = "expected an IP address or a DNS name such as superlink.example.org"
    raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name: {hint}")


def write_certificates(outdir: str | Path, hosts: Sequence[str], nodes: int = 2, days: int = 365) -> CertFiles:
    """Write a CA, a SuperLink certificate and ``nodes`` SuperNode key pairs into ``outdir``.

    Files (private keys are created with mode 0o600; ``outdir``, if new, 0o700):

    - ``ca.pem``, ``ca.key``: a self-signed CA (basicConstraints CA=true,
      keyUsage keyCertSign/cRLSign). SuperNodes and ``flwr`` get ``ca.pem``
      (``--root-certificates``, ``root-certificates`` in the Flower config);
      the SuperLink gets it as ``--ssl-ca-certfile``. ``ca.key`` signs and
      should then stay offline.
    - ``server.pem``, ``server.key``: the SuperLink's certificate, signed by
      the CA (``--ssl-certfile``, ``--ssl-keyfile``). Its subject alternative
      names are ``hosts`` plus 127.0.0.1, ::1 and localhost (IP addresses as
      IP SANs, names as DNS SANs), because the SuperLink's own SuperExec
      connects to 127.0.0.1 and verifies it; it is a TLS server certificate
      (extendedKeyUsage serverAuth, CA=false).
    - ``node{k}``, ``node{k}.pub`` for k < ``nodes``: a SuperNode's
      authentication key pair, EC SECP384R1 in OpenSSH format, which Flower
      requires: ``flower-supernode --auth-supernode-private-key node0`` and
      ``flwr supernode register node0.pub``.

    Certificates are valid from one minute ago for ``days`` days, with random
    serial numbers; every file is written via a temporary file and a rename.
    Nothing is overwritten: any of these files already in ``outdir`` is a
    one-line :class:`ConfigError`, as are bad hosts, ``nodes < 0`` and ``days < 1``.
    """
    names = server_names(hosts)
    if nodes < 0:
        raise ConfigError(f"--nodes must be 0 or more, got {nodes}")
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    crypto = _cryptography()
    out = Path(outdir)
    files = CertFiles(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key",
                      tuple(out / f"node{k}" for k in range(nodes)),
                      tuple(out / f"node{k}.pub" for k in range(nodes)), names)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is not a directory; choose an empty directory")
    for path in files.paths():
        if path.exists():
            raise ConfigError(f"{str(path)!r} already exists and would be overwritten; choose an empty directory")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_all(crypto, files, days)
    except OSError as e:
        raise FedTrustError(f"cannot write certificates to {str(out)!r}: {e.strerror or e}") from None
    return files


def _cryptography() -> dict[str, Any]:
    """The ``cryptography`` modules used here, imported on first use; a one-line error when missing."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise FedTrustError("fedtrust flower-certs needs the cryptography package: pip install cryptography "
                            "(or pip install 'fedtrust[flower]')") from None
    return dict(x509=x509, hashes=hashes, serialization=serialization, ec=ec,
                ExtendedKeyUsageOID=ExtendedKeyUsageOID, NameOID=NameOID)


def _write_all(c: dict[str, Any], files: CertFiles, days: int) -> None:
    x509, ec, ser = c["x509"], c["ec"], c["serialization"]
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(c["NameOID"].COMMON_NAME, CA_NAME)])
    ca_cert = _certificate(c, ca_name, ca_name, ca_key.public_key(), ca_key, start, end, ca=True, names=())

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(c["NameOID"].COMMON_NAME, files.server_names[0])])
    server_cert = _certificate(c, server_name, ca_name, server_key.public_key(), ca_key, start, end, ca=False,
                               names=files.server_names)

    pem, pkcs8, none = ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()
    _write_atomic(files.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write_atomic(files.ca_key, ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write_atomic(files.server_cert, server_cert.public_bytes(pem), private=False)
    _write_atomic(files.server_key, server_key.private_bytes(pem, pkcs8, none), private=True)
    for key_path, pub_path in zip(files.node_keys, files.node_public_keys):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_atomic(key_path, key.private_bytes(pem, ser.PrivateFormat.OpenSSH, none), private=True)
        public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
        _write_atomic(pub_path, public + f" fedtrust-{key_path.name}\n".encode(), private=False)


def _certificate(c: dict[str, Any], subject: Any, issuer: Any, public_key: Any, signing_key: Any,
                 start: datetime.datetime, end: datetime.datetime, ca: bool, names: Sequence[str]) -> Any:
    """An X.509 certificate: a CA (``ca``) or a TLS server certificate for ``names``, signed with SHA-384."""
    x509 = c["x509"]
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(secrets.randbits(159) + 1).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                              critical=False))
    if not ca:
        sans = [_general_name(x509, name) for name in names]
        builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([c["ExtendedKeyUsageOID"].SERVER_AUTH]), critical=False))
    return builder.sign(signing_key, c["hashes"].SHA384())


def _general_name(x509: Any, name: str) -> Any:
    """An IP address as an IPAddress SAN (clients check IPs only there), anything else as a DNSName SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_atomic(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    The temporary file is created with mode 0o600 (``mkstemp``), so a private
    key is never readable by others, even for a moment; a public file is then
    opened up to 0o644 before the rename.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
