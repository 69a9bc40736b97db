"""Doctors' logins for the chat: names with salted scrypt password hashes in a local SQLite file.

Plaintext passwords are never stored; each user has a random 16-byte salt. The file defaults to
`data/users.db`; the environment variable `FEDERIMED_USERS_DB` points elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_USERS_DB = Path("data/users.db")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
MIN_PASSWORD_LENGTH = 8
# scrypt cost: n=2**14, r=8 takes ~50 ms and 16 MiB, the cost Python's docs and OWASP suggest as a floor.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    n INTEGER NOT NULL,
    r INTEGER NOT NULL,
    p INTEGER NOT NULL,
    created TEXT NOT NULL
)
"""


class UserError(ValueError):
    """A user cannot be added or removed (bad name, weak password, duplicate, unknown)."""


@dataclass(frozen=True)
class User:
    """A registered doctor (no secrets)."""

    name: str
    created: str


def default_users_db() -> Path:
    """The user store's path: `$FEDERIMED_USERS_DB` or `data/users.db`."""
    return Path(os.environ.get("FEDERIMED_USERS_DB", DEFAULT_USERS_DB))


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


class UserStore:
    """Add, list, remove and verify users in one SQLite file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_users_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def add(self, name: str, password: str) -> User:
        """Register `name`; raises UserError for a bad name, a short password or an existing user."""
        if not NAME_PATTERN.match(name):
            raise UserError(
                f"invalid user name {name!r}: use 2-64 letters, digits or . _ @ - (starting with a letter or digit)"
            )
        if len(password) < MIN_PASSWORD_LENGTH:
            raise UserError(f"password for {name!r} is too short: at least {MIN_PASSWORD_LENGTH} characters")
        salt = secrets.token_bytes(16)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        digest = _hash(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        try:
            with closing(self._connect()) as db, db:
                db.execute(
                    "INSERT INTO users (name, salt, hash, n, r, p, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, salt, digest, SCRYPT_N, SCRYPT_R, SCRYPT_P, created),
                )
        except sqlite3.IntegrityError as exc:
            raise UserError(f"user {name!r} already exists in {self.path}") from exc
        return User(name, created)

    def remove(self, name: str) -> None:
        """Delete `name`; raises UserError if there is no such user."""
        with closing(self._connect()) as db, db:
            deleted = db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount
        if not deleted:
            raise UserError(f"no user {name!r} in {self.path}")

    def list(self) -> list[User]:
        """All users, by name."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT name, created FROM users ORDER BY name").fetchall()
        return [User(name, created) for name, created in rows]

    def verify(self, name: str, password: str) -> bool:
        """True if `name` exists and `password` matches (constant-time comparison)."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT salt, hash, n, r, p FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            # Hash anyway so that an unknown name takes as long as a wrong password.
            _hash(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
            return False
        salt, digest, n, r, p = row
        return hmac.compare_digest(_hash(password, salt, n, r, p), digest)
