"""`federimed certs` and `federimed hospital keygen`: TLS that really handshakes, keys Flower accepts."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from federimed.commands import security, train
from federimed.security.certs import (
    KeyFileError,
    check_site_key,
    create_site_key,
    create_tls,
    server_tls,
)

runner = CliRunner()


app = typer.Typer()  # the commands as the root CLI registers them
train.register(app)
security.register(app)


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _handshake(tls_dir: Path, server_name: str, trust: Path) -> str:
    """Serve one TLS connection with the server certificate; return the client's view of the peer."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(trust))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            return tls.recv(2).decode()
    finally:
        thread.join(10)
        listener.close()


def test_certs_writes_a_ca_and_a_server_certificate_that_handshakes(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    result = _invoke("certs", "--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3")
    assert result.exit_code == 0, result.output
    assert _mode(out / "ca.key") == 0o600 and _mode(out / "server.key") == 0o600
    assert _mode(out / "server.crt") == 0o644

    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3", "::1"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    assert _handshake(out, "localhost", out / "ca.crt") == "ok"
    assert _handshake(out, "127.0.0.1", out / "ca.crt") == "ok"


def test_a_client_refuses_the_server_for_another_name_or_another_ca(tmp_path: Path) -> None:
    files = create_tls(tmp_path / "tls")
    other = create_tls(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _handshake(files.server_cert.parent, "attacker.example", files.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(files.server_cert.parent, "localhost", other.ca_cert)


def test_certs_never_overwrites_without_force(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    create_tls(out)
    before = (out / "ca.key").read_bytes()
    result = _invoke("certs", "--out", str(out))
    assert result.exit_code == 2 and "already exist" in result.output and "ca.key" in result.output
    assert (out / "ca.key").read_bytes() == before
    assert _invoke("certs", "--out", str(out), "--force").exit_code == 0
    assert (out / "ca.key").read_bytes() != before and _mode(out / "ca.key") == 0o600


def test_keygen_writes_a_key_pair_that_flower_loads(tmp_path: Path) -> None:
    result = _invoke("hospital", "keygen", "--out", str(tmp_path / "keys"), "--name", "alpha")
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "alpha", tmp_path / "keys" / "alpha.pub"
    assert _mode(private) == 0o600
    # What flower-supernode --auth-supernode-private-key and flwr supernode register do with them:
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_keygen_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = create_site_key(tmp_path, "beta")
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(key.public)], capture_output=True, text=True, check=True)
    assert key.fingerprint in listed.stdout
    result = _invoke("hospital", "keygen", "--out", str(tmp_path), "--name", "beta")
    assert result.exit_code == 2 and "already exist" in result.output


@pytest.mark.parametrize("name", ["", "../escape", "a b", "-dash"])
def test_keygen_refuses_a_name_that_is_not_a_file_name(tmp_path: Path, name: str) -> None:
    result = _invoke("hospital", "keygen", "--out", str(tmp_path), "--name", name)
    assert result.exit_code == 2 and "site name" in result.output
    assert list(tmp_path.iterdir()) == []


def test_server_tls_finds_the_files_without_the_ca_key_and_names_what_is_missing(tmp_path: Path) -> None:
    files = create_tls(tmp_path / "tls")
    files.ca_key.unlink()  # kept offline, as recommended
    assert server_tls(tmp_path / "tls").server_key == files.server_key
    files.server_key.unlink()
    with pytest.raises(KeyFileError, match=r"tls: server.key missing"):
        server_tls(tmp_path / "tls")
    create_tls(tmp_path / "broken")
    (tmp_path / "broken" / "ca.crt").write_text("not a certificate")
    with pytest.raises(KeyFileError, match=r"ca.crt is not a readable PEM certificate"):
        server_tls(tmp_path / "broken")


def test_check_site_key_accepts_keygen_output_and_refuses_other_files(tmp_path: Path) -> None:
    key = create_site_key(tmp_path, "alpha")
    assert check_site_key(key.private) == key.private
    with pytest.raises(KeyFileError, match="not an unencrypted OpenSSH private key"):
        check_site_key(key.public)
    with pytest.raises(KeyFileError, match="not an unencrypted OpenSSH private key"):
        check_site_key(tmp_path / "absent")
    key.private.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        check_site_key(key.private)


def test_server_security_options_fail_clearly_before_starting_anything(tmp_path: Path) -> None:
    tls = create_tls(tmp_path / "tls").ca_cert.parent
    (tmp_path / "empty").mkdir()
    cases = [
        (["--auth", str(tmp_path / "empty")], "--auth needs --tls"),
        (["--tls", str(tmp_path / "empty")], "ca.crt, server.crt, server.key missing"),
        (["--tls", str(tls), "--auth", str(tmp_path / "empty")], "no hospital public key (*.pub)"),
        (["--aggregator", "krum"], "'krum' is not one of"),
    ]
    for args, message in cases:
        result = _invoke("server", "--runs-dir", str(tmp_path / "runs"), *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "runs" / ".flower").exists()  # no SuperLink was started


def test_hospital_join_security_options_fail_clearly_before_starting_anything(tmp_path: Path) -> None:
    from fl_support import make_hospital

    data = make_hospital(tmp_path, "alpha", 2)
    tls = create_tls(tmp_path / "tls")
    key = create_site_key(tmp_path / "keys", "alpha")
    key.private.chmod(0o640)
    cases = [
        (["--key", str(key.private)], "--key needs --ca"),
        (["--ca", str(key.public)], "is not a readable PEM certificate"),
        (["--ca", str(tls.ca_cert), "--key", str(key.private)], "readable by other users"),
        (["--ca", str(tls.ca_cert), "--key", str(key.public)], "not an unencrypted OpenSSH private key"),
    ]
    for args, message in cases:
        result = _invoke("hospital", "join", "--superlink", "127.0.0.1:9", "--data", str(data), *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
