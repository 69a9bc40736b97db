"""Security commands: `certs` (TLS for the SuperLink) and `hospital keygen` (a hospital's SuperNode key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federimed.commands import fail

console = Console()


def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt, ca.key, server.crt and server.key.", resolve_path=True)],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Extra DNS name or IP the SuperLink is reached at (repeatable); localhost, 127.0.0.1 "
                     "and ::1 are always included."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of the CA and server certificate in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace existing files in OUT.")] = False,
) -> None:
    """Create a private CA and a TLS server certificate for the SuperLink (`federimed server --tls OUT`).

    Give hospitals ca.crt only (`federimed hospital join --ca ca.crt`); keep ca.key offline.
    Keys are written with mode 0600.
    """
    from federimed.security.certs import KeyFileError, create_tls

    try:
        files = create_tls(out, host or [], days=days, force=force)
    except (KeyFileError, ValueError) as err:
        raise fail(str(err)) from None
    table = Table(title=f"TLS material in {out}")
    table.add_column("file")
    table.add_column("who needs it")
    table.add_row(str(files.ca_cert), "the SuperLink and every hospital (--ca)")
    table.add_row(str(files.server_cert), "the SuperLink")
    table.add_row(str(files.server_key), "the SuperLink only (secret, 0600)")
    table.add_row(str(files.ca_key), "nobody online: signs new certificates (secret, 0600)")
    console.print(table)


def keygen(
    out: Annotated[Path, typer.Option(help="Directory for the key pair NAME and NAME.pub.", resolve_path=True)],
    name: Annotated[str, typer.Option(help="This hospital's name (file name and key comment).")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Create this hospital's SuperNode key pair (ECDSA P-384, OpenSSH format).

    Send NAME.pub to the federation operator (it goes into the directory given to `federimed server
    --auth`) and check the fingerprint with them by another channel; NAME stays here (0600) and is passed
    to `federimed hospital join --key`.
    """
    from federimed.security.certs import KeyFileError, create_site_key

    try:
        key = create_site_key(out, name, force=force)
    except (KeyFileError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"private key: {key.private} (keep it here, 0600)")
    console.print(f"public key:  {key.public} (send to the federation operator)")
    console.print(f"fingerprint: {key.fingerprint}")


def register(app: typer.Typer) -> None:
    """Add `certs` to the root app and `keygen` to the `hospital` group (created by commands.train)."""
    from federimed.commands.train import hospital_app

    app.command()(certs)
    hospital_app.command()(keygen)
