"""The chat's user store: salted hashes only, verification, and the `federimed users` commands."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federimed.cli import app
from federimed.users import UserError, UserStore, default_users_db

PASSWORD = "correct horse battery"


@pytest.fixture()
def store(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "users.db")


def test_add_verify_list_remove(store: UserStore) -> None:
    store.add("dr.house", PASSWORD)
    store.add("dr.grey", "another password")
    assert [u.name for u in store.list()] == ["dr.grey", "dr.house"]
    assert store.verify("dr.house", PASSWORD)
    assert not store.verify("dr.house", PASSWORD + "!")
    assert not store.verify("dr.house", "another password")
    assert not store.verify("nobody", PASSWORD)
    store.remove("dr.house")
    assert [u.name for u in store.list()] == ["dr.grey"]
    assert not store.verify("dr.house", PASSWORD)


def test_only_salted_hashes_are_stored(store: UserStore) -> None:
    store.add("alice", PASSWORD)
    store.add("bob", PASSWORD)
    raw = store.path.read_bytes()
    assert PASSWORD.encode() not in raw
    with sqlite3.connect(store.path) as db:
        rows = {name: salt + digest for name, salt, digest in db.execute("SELECT name, salt, hash FROM users")}
        columns = [c[1] for c in db.execute("PRAGMA table_info(users)")]
    assert "password" not in columns
    assert rows["alice"] != rows["bob"], "same password, different salt → different hash"
    assert all(len(v) == 16 + 32 for v in rows.values())


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("dr house", PASSWORD, "invalid user name"),
        ("", PASSWORD, "invalid user name"),
        ("x" * 65, PASSWORD, "invalid user name"),
        ("dr.house", "short", "too short"),
    ],
)
def test_bad_input_is_refused(store: UserStore, name: str, password: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        store.add(name, password)
    assert store.list() == []


def test_duplicate_and_unknown_users(store: UserStore) -> None:
    store.add("dr.house", PASSWORD)
    with pytest.raises(UserError, match="already exists"):
        store.add("dr.house", "something else entirely")
    assert store.verify("dr.house", PASSWORD), "a refused duplicate must not change the password"
    with pytest.raises(UserError, match="no user 'nobody'"):
        store.remove("nobody")


def test_env_overrides_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDERIMED_USERS_DB", raising=False)
    assert default_users_db() == Path("data/users.db")
    monkeypatch.setenv("FEDERIMED_USERS_DB", str(tmp_path / "elsewhere.db"))
    assert UserStore().path == tmp_path / "elsewhere.db"


def test_cli_add_list_remove(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "users.db")
    added = runner.invoke(app, ["users", "add", "dr.grey", "--password-stdin", "--db", db], input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    assert UserStore(Path(db)).verify("dr.grey", PASSWORD)

    listed = runner.invoke(app, ["users", "list", "--db", db])
    assert listed.exit_code == 0 and "dr.grey" in listed.output

    weak = runner.invoke(app, ["users", "add", "dr.who", "--password-stdin", "--db", db], input="123\n")
    assert weak.exit_code == 1 and "too short" in weak.output

    assert runner.invoke(app, ["users", "remove", "dr.grey", "--db", db]).exit_code == 0
    missing = runner.invoke(app, ["users", "remove", "dr.grey", "--db", db])
    assert missing.exit_code == 1 and "no user" in missing.output
