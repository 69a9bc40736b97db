"""Run `federimed chat` as a child process on loopback and wait until it serves: the browser tests and the
load benchmark drive the real server this way."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from federimed.fl.deployment import free_port

READY_LINE = "Your app is available at"


class ChatServerError(RuntimeError):
    """The chat server did not start; the message ends with its last log lines."""


@dataclass
class ChatServer:
    url: str
    database: Path
    log: list[str] = field(default_factory=list)


@contextmanager
def chat_server(
    folder: Path, *, runs_dir: Path, index_dir: Path, users_db: Path, startup_s: float = 180.0, options: tuple[str, ...] = ()
) -> Iterator[ChatServer]:
    """`federimed chat [options]` on a free loopback port with its history in `folder/chainlit.db` and a fresh
    login secret; stopped (its whole process group) on exit."""
    port, database = free_port(), folder / "chainlit.db"
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # chainlit run behaves differently under CI
    env |= {"FEDERIMED_DATABASE_URL": f"sqlite+aiosqlite:///{database}", "CHAINLIT_AUTH_SECRET": secrets.token_urlsafe(32)}
    command = [
        sys.executable, "-m", "federimed.cli", "chat", "--host", "127.0.0.1", "--port", str(port),
        "--runs-dir", str(runs_dir), "--index-dir", str(index_dir), "--db", str(users_db), *options,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    server = ChatServer(f"http://127.0.0.1:{port}", database)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            server.log.append(line)
            if READY_LINE in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + startup_s
        while not ready.wait(1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ChatServerError("the chat server did not start:\n" + "".join(server.log[-40:]))
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (gone already if it died at start)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
