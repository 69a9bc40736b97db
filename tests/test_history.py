"""Chat history storage: the schema Chainlit's SQLAlchemy data layer writes into, its upgrade, the
inline text storage, and scrubbing of what doctors type before it is stored."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

from federimed.history import _storage_client_class, chainlit_columns, create_schema, data_layer


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_schema_has_every_column_chainlit_writes(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "chat.db"
    assert asyncio.run(create_schema(f"sqlite+aiosqlite:///{db}")) == []
    for table, wanted in chainlit_columns().items():
        assert wanted <= columns(db, table), f"{table} lacks {wanted - columns(db, table)}"
    assert {"users", "threads", "steps", "elements", "feedbacks"} <= {
        row[0] for row in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def test_an_older_database_gains_the_missing_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the steps table as Chainlit's docs gave it before 2.3
        conn.execute('CREATE TABLE steps ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL, '
                     '"threadId" TEXT NOT NULL, "streaming" BOOLEAN NOT NULL, "output" TEXT)')  # fmt: skip
    added = asyncio.run(create_schema(f"sqlite+aiosqlite:///{db}"))
    assert "steps.defaultOpen" in added and "steps.autoCollapse" in added
    assert chainlit_columns()["steps"] <= columns(db, "steps")
    assert asyncio.run(create_schema(f"sqlite+aiosqlite:///{db}")) == [], "a second start changes nothing"


def test_only_plain_text_elements_are_kept_inline() -> None:
    storage = _storage_client_class()()
    text = asyncio.run(storage.upload_file("u/e/Source 1", "Offer lisinopril.", mime="text/plain"))
    assert text["url"] == "data:text/plain;charset=utf-8;base64,T2ZmZXIgbGlzaW5vcHJpbC4="
    bundle = asyncio.run(storage.upload_file("u/e/patient.json", b'{"resourceType": "Bundle"}', mime="application/json"))
    assert bundle["url"] is None, "an uploaded FHIR bundle must not be stored"


def test_what_doctors_type_is_scrubbed_before_it_is_stored(tmp_path: Path) -> None:
    from chainlit.context import init_http_context
    from chainlit.user import User

    db = tmp_path / "chat.db"
    layer = data_layer(f"sqlite+aiosqlite:///{db}")
    thread_id, step_id = str(uuid.uuid4()), str(uuid.uuid4())
    raw = "Name: Jonathan Quimby\nSSN 123-45-6789\nNew diagnosis: Essential hypertension"

    async def store() -> None:
        init_http_context()  # Chainlit's data layer runs inside a request or socket context
        user = await layer.create_user(User(identifier="dr.grey"))
        await layer.update_thread(thread_id, name=raw, user_id=user.id)
        await layer.create_step({"id": step_id, "threadId": thread_id, "name": "dr.grey", "type": "user_message",
                                 "streaming": False, "output": raw, "metadata": {}})  # fmt: skip

    asyncio.run(store())
    with sqlite3.connect(db) as conn:
        name = conn.execute("SELECT name FROM threads").fetchone()[0]
        output = conn.execute("SELECT output FROM steps").fetchone()[0]
    for stored in (name, output):
        assert "Quimby" not in stored and "123-45-6789" not in stored
        assert "Essential hypertension" in stored
