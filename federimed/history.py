"""Chat history for the doctors' app: Chainlit's SQLAlchemy data layer on SQLite or PostgreSQL.

Chainlit does not create its tables, and its data layer writes every key of `StepDict` / `ElementDict`
as a column (a missing column silently drops the row: chainlit#2832). So the schema is declared here
with SQLAlchemy (dialect-appropriate types), created at start-up, and any column a newer Chainlit
writes that an older database lacks is added. Only the guideline excerpts the app attaches (plain
text) are stored, inline as `data:` URLs; uploaded FHIR bundles are never kept. What doctors type
(their messages, and the thread names Chainlit derives from them) is stored only after
`scrub_free_text`, whatever order Chainlit's background writes run in.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Boolean, Column, ForeignKey, Integer, MetaData, Table, Text, inspect
from sqlalchemy.dialects import postgresql

if TYPE_CHECKING:
    from chainlit.data.sql_alchemy import SQLAlchemyDataLayer

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///data/chainlit.db"
STORED_MIME = "text/plain"

_UUID = Text().with_variant(postgresql.UUID(as_uuid=False), "postgresql")
_JSON = JSON().with_variant(postgresql.JSONB(), "postgresql")
_TAGS = Text().with_variant(postgresql.ARRAY(Text), "postgresql")

metadata = MetaData()
users = Table(
    "users", metadata,
    Column("id", _UUID, primary_key=True),
    Column("identifier", Text, nullable=False, unique=True),
    Column("metadata", _JSON, nullable=False),
    Column("createdAt", Text),
)  # fmt: skip
threads = Table(
    "threads", metadata,
    Column("id", _UUID, primary_key=True),
    Column("createdAt", Text),
    Column("name", Text),
    Column("userId", _UUID, ForeignKey("users.id", ondelete="CASCADE")),
    Column("userIdentifier", Text),
    Column("tags", _TAGS),
    Column("metadata", _JSON),
)  # fmt: skip
steps = Table(
    "steps", metadata,
    Column("id", _UUID, primary_key=True),
    Column("name", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("threadId", _UUID, ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    Column("parentId", _UUID),
    Column("streaming", Boolean, nullable=False),
    Column("waitForAnswer", Boolean),
    Column("isError", Boolean),
    Column("metadata", _JSON),
    Column("tags", _TAGS),
    Column("input", Text),
    Column("output", Text),
    Column("createdAt", Text),
    Column("command", Text),
    Column("modes", _JSON),
    Column("start", Text),
    Column("end", Text),
    Column("generation", _JSON),
    Column("showInput", Text),
    Column("language", Text),
    Column("indent", Integer),
    Column("defaultOpen", Boolean),
    Column("autoCollapse", Boolean),
    Column("icon", Text),
)  # fmt: skip
elements = Table(
    "elements", metadata,
    Column("id", _UUID, primary_key=True),
    Column("threadId", _UUID, ForeignKey("threads.id", ondelete="CASCADE")),
    Column("type", Text),
    Column("url", Text),
    Column("chainlitKey", Text),
    Column("name", Text, nullable=False),
    Column("display", Text),
    Column("objectKey", Text),
    Column("size", Text),
    Column("page", Integer),
    Column("language", Text),
    Column("forId", _UUID),
    Column("mime", Text),
    Column("props", _JSON),
    Column("autoPlay", Boolean),
    Column("playerConfig", _JSON),
)  # fmt: skip
feedbacks = Table(
    "feedbacks", metadata,
    Column("id", _UUID, primary_key=True),
    Column("forId", _UUID, nullable=False),
    Column("threadId", _UUID, ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    Column("value", Integer, nullable=False),
    Column("comment", Text),
)  # fmt: skip

# Keys of Chainlit's dicts that its data layer never writes as columns.
_NOT_COLUMNS = {"steps": {"feedback"}, "elements": {"path"}}


def database_url() -> str:
    """`$FEDERIMED_DATABASE_URL` (e.g. postgresql+asyncpg://…) or the local SQLite file."""
    return os.environ.get("FEDERIMED_DATABASE_URL") or DEFAULT_DATABASE_URL


def chainlit_columns() -> dict[str, set[str]]:
    """The columns the installed Chainlit writes into `steps` and `elements`."""
    from chainlit.element import ElementDict
    from chainlit.step import StepDict

    return {
        "steps": set(StepDict.__annotations__) - _NOT_COLUMNS["steps"],
        "elements": set(ElementDict.__annotations__) - _NOT_COLUMNS["elements"],
    }


async def create_schema(url: str) -> list[str]:
    """Create the tables that are missing and add the columns Chainlit writes that a table lacks.

    Returns the columns added to existing tables ("steps.autoCollapse"), empty for a fresh database.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    if url.startswith("sqlite"):
        database = url.split(":///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            return await conn.run_sync(_add_missing_columns)
    finally:
        await engine.dispose()


def _add_missing_columns(conn: Any) -> list[str]:
    added = []
    for table_name, wanted in chainlit_columns().items():
        table = metadata.tables[table_name]
        present = {c["name"] for c in inspect(conn).get_columns(table_name)}
        for name in sorted(wanted - present):
            column = table.c[name] if name in table.c else Column(name, Text)
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE {table_name} ADD COLUMN "{name}" {kind}')
            added.append(f"{table_name}.{name}")
    return added


def create_schema_sync(url: str) -> list[str]:
    """`create_schema` from synchronous code, also while an event loop runs in this thread."""
    result: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(create_schema(url)))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=run, name="federimed-schema")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]


def _storage_client_class() -> type:
    from chainlit.data.storage_clients.base import BaseStorageClient

    class InlineTextStorage(BaseStorageClient):
        """Keeps plain-text elements inside the database as `data:` URLs; refuses everything else."""

        async def upload_file(
            self,
            object_key: str,
            data: bytes | str,
            mime: str = "application/octet-stream",
            overwrite: bool = True,
            content_disposition: str | None = None,
        ) -> dict[str, Any]:
            if mime.split(";")[0].strip() != STORED_MIME:
                return {"object_key": "", "url": None}  # e.g. an uploaded bundle: not kept
            raw = data.encode() if isinstance(data, str) else data
            return {"object_key": "", "url": f"data:{STORED_MIME};charset=utf-8;base64,{base64.b64encode(raw).decode()}"}

        async def delete_file(self, object_key: str) -> bool:
            return True

        async def get_read_url(self, object_key: str) -> str:
            return object_key

        async def close(self) -> None:
            return None

    return InlineTextStorage


def _data_layer_class() -> type:
    from chainlit.data.sql_alchemy import SQLAlchemyDataLayer

    from federimed.scrub import scrub_free_text

    class DeidentifyingDataLayer(SQLAlchemyDataLayer):
        """Chainlit's SQLAlchemy data layer that scrubs doctors' text before it is stored."""

        async def update_thread(self, thread_id: str, name: str | None = None, *args: Any, **kwargs: Any) -> None:
            await super().update_thread(thread_id, scrub_free_text(name) if name else name, *args, **kwargs)

        async def create_step(self, step_dict: dict[str, Any]) -> None:
            if step_dict.get("type") == "user_message":
                step_dict = step_dict | {
                    key: scrub_free_text(step_dict[key]) for key in ("input", "output") if step_dict.get(key)
                }
            await super().create_step(step_dict)

    return DeidentifyingDataLayer


def data_layer(url: str | None = None) -> SQLAlchemyDataLayer:
    """The de-identifying SQLAlchemy data layer on `url` (default `database_url()`), its schema ensured."""
    url = url or database_url()
    create_schema_sync(url)
    return _data_layer_class()(conninfo=url, storage_provider=_storage_client_class()())
