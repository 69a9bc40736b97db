"""TLS material for the SuperLink and authentication keys for hospital SuperNodes (`cryptography`).

- `create_tls(out, hosts)`: a private CA and a server certificate signed by it, valid for localhost,
  127.0.0.1, ::1 and `hosts`. The SuperLink uses `ca.crt`, `server.crt` and `server.key`
  (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`); hospitals get only `ca.crt` (`--root-certificates`).
  `ca.key` signs certificates: keep it offline, it never goes to the SuperLink host's working directory
  in production.
- `create_site_key(out, name)`: an ECDSA P-384 key pair in OpenSSH format, what Flower 1.42 expects:
  `flower-supernode --auth-supernode-private-key NAME` reads the private key
  (`load_ssh_private_key`, EC only) and `flwr supernode register NAME.pub` the public key
  (`load_ssh_public_key`, NIST curves only).

Private keys are written with mode 0600 and existing files are never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from base64 import b64decode, b64encode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
_CURVE = ec.SECP384R1
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyFileError(ValueError):
    """A key or certificate file cannot be written or read."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS material `create_tls` writes."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKey:
    """A hospital's SuperNode key pair and the SHA-256 fingerprint of its public key (as `ssh-keygen -l`)."""

    private: Path
    public: Path
    fingerprint: str


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    """Write `data` to `path`; secrets are created 0600 from the start (never world-readable, even briefly)."""
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if secret else 0o644)  # O_CREAT's mode does not apply to an existing file


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_tls(out: Path, hosts: Sequence[str] = (), *, days: int = 365, force: bool = False) -> TlsFiles:
    """Write a CA and a SuperLink server certificate (SAN: localhost, 127.0.0.1, ::1 and `hosts`) into `out`."""
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got {days}")
    out = Path(out)
    files = TlsFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    if not force and (existing := [str(p) for p in vars(files).values() if p.exists()]):
        raise KeyFileError(f"{', '.join(existing)} already exist(s) (use --force to replace)")
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FederiMed federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san([*DEFAULT_HOSTS, *hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write(files.ca_key, _pem_key(ca_key), secret=True, force=force)
    _write(files.server_key, _pem_key(server_key), secret=True, force=force)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    return files


def server_tls(directory: Path) -> TlsFiles:
    """The SuperLink's TLS files in `directory` (as `create_tls` names them); `ca.key` need not be there."""
    directory = Path(directory)
    files = TlsFiles(directory / CA_CERT, directory / CA_KEY, directory / SERVER_CERT, directory / SERVER_KEY)
    missing = [p.name for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
    if missing:
        raise KeyFileError(f"{directory}: {', '.join(missing)} missing (create them with `federimed certs --out DIR`)")
    for cert in (files.ca_cert, files.server_cert):
        check_certificate(cert)
    return files


def check_certificate(path: Path) -> Path:
    """`path` if it holds a PEM certificate, else a KeyFileError naming the file."""
    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path} is not a readable PEM certificate: {err}") from None
    return Path(path)


def check_site_key(path: Path) -> Path:
    """`path` if it holds an unencrypted OpenSSH EC private key (what Flower's SuperNode loads), else KeyFileError."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(
            f"{path} is not an unencrypted OpenSSH private key (create one with `federimed hospital keygen`): {err}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}; Flower SuperNodes need an EC key (ECDSA)")
    if Path(path).stat().st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by other users: `chmod 600 {path}`")
    return Path(path)


def fingerprint(public_key_line: str) -> str:
    """SHA256 fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it."""
    parts = public_key_line.split()
    if len(parts) < 2:
        raise KeyFileError("not an OpenSSH public key line (expected '<type> <base64> [comment]')")
    digest = hashlib.sha256(b64decode(parts[1])).digest()
    return "SHA256:" + b64encode(digest).decode().rstrip("=")


def create_site_key(out: Path, name: str, *, force: bool = False) -> SiteKey:
    """Write `out/NAME` (OpenSSH ECDSA P-384 private key, 0600) and `out/NAME.pub` for one hospital."""
    if not _SITE_NAME.match(name):
        raise ValueError(f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    out = Path(out)
    private, public = out / name, out / f"{name}.pub"
    if not force and (existing := [str(p) for p in (private, public) if p.exists()]):
        raise KeyFileError(f"{', '.join(existing)} already exist(s) (use --force to replace)")
    key = ec.generate_private_key(_CURVE())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_line = f"{line.decode()} federimed-{name}\n"
    _write(private, private_bytes, secret=True, force=force)
    _write(public, public_line.encode(), secret=False, force=force)
    return SiteKey(private, public, fingerprint(public_line))
