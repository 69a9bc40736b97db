"""Start, watch and stop Flower deployment processes (SuperLink, SuperNodes, `flwr run`).

Every process starts in its own session (process group) with its output in a log file, and `stop()`
signals the whole group: a SuperNode's or SuperLink's `flower-superexec` children outlive a SIGTERM to
their parent otherwise. In Flower 1.42 a SuperLink serves the Fleet, Control and Runtime APIs on one
port (`--host/--port`); each SuperNode also opens its own Runtime API port for its ClientApp process.
`FLWR_HOME` holds the `flwr` CLI's connections (`config.toml`) and installed apps, so point it at a
private directory to keep runs isolated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


class FlowerProcessError(RuntimeError):
    """A Flower process did not start or ended badly."""


@dataclass
class FlowerProcess:
    """One Flower command running in its own process group, logging to `log` (None: to our stdout)."""

    name: str
    popen: subprocess.Popen
    log: Path | None

    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of the process's log."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the main process to exit; return its exit code."""
        return self.popen.wait(timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after `grace` seconds."""
        group = self.popen.pid  # start_new_session: the group id is the leader's pid
        if not _group_alive(group):
            self.popen.poll()
            return
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_alive(group) and time.monotonic() < deadline:
            self.popen.poll()
            time.sleep(0.1)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
            while _group_alive(group):
                self.popen.poll()
                time.sleep(0.05)
        self.popen.poll()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies of our own child are reaped first)."""
    try:
        os.waitpid(-group, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_state(pid) not in ("Z", "X", "") for pid in group_members(group))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def group_members(group: int) -> list[int]:
    """Pids of the processes in process group `group` (Linux /proc; empty elsewhere)."""
    members = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group:
                members.append(int(entry.name))
    return members


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(process: FlowerProcess, host: str, port: int, timeout: float = 60.0) -> None:
    """Block until `host:port` accepts connections; fail early, with the log, if `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise FlowerProcessError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerProcessError(f"{process.name} did not open {host}:{port} within {timeout:.0f} s:\n{process.tail()}")


def flower_command(name: str) -> str:
    """The path of a Flower console script next to this Python (the venv's), else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with FLWR_HOME set (and the venv's bin first on PATH for superexec children)."""
    env = dict(os.environ) | {"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | dict(extra or {})


def start(
    name: str, argv: Sequence[str], *, log: Path | None, env: Mapping[str, str], cwd: Path | None = None
) -> FlowerProcess:
    """Start `argv` in a new session, its stdout and stderr going to `log` (None: to ours)."""
    if log is None:
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd, start_new_session=True)
        return FlowerProcess(name, popen, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), cwd=cwd, start_new_session=True,
        )
    return FlowerProcess(name, popen, log)


def start_superlink(*, port: int, flwr_home: Path, log: Path | None, host: str = LOOPBACK) -> FlowerProcess:
    """Start an insecure SuperLink (Fleet, Control and Runtime APIs on `host:port`) and wait until it listens."""
    argv = [flower_command("flower-superlink"), "--insecure", "--host", host, "--port", str(port)]
    process = start("superlink", argv, log=log, env=flower_env(flwr_home))
    wait_for_port(process, host if host != "0.0.0.0" else LOOPBACK, port)
    return process


def node_config_arg(config: Mapping[str, str | int | float | bool]) -> str:
    """`--node-config` text: space-separated key=value, values as TOML (strings quoted)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())


def start_supernode(
    *,
    name: str,
    superlink: str,
    data_path: Path,
    port: int,
    flwr_home: Path,
    log: Path | None,
    outbox: Path | None = None,
) -> FlowerProcess:
    """Start an insecure SuperNode for one hospital; its ClientApp reads `data_path` (node config)."""
    config = {"data-path": str(Path(data_path).resolve())} | ({"outbox": str(outbox)} if outbox else {})
    argv = [
        flower_command("flower-supernode"), "--insecure", "--superlink", superlink,
        "--host", LOOPBACK, "--port", str(port), "--node-config", node_config_arg(config),
    ]
    process = start(name, argv, log=log, env=flower_env(flwr_home))
    wait_for_port(process, LOOPBACK, port)
    return process


def add_connection(flwr_home: Path, name: str, address: str) -> None:
    """Write an insecure SuperLink connection `name` → `address` into FLWR_HOME/config.toml (as default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )


def write_run_config(path: Path, run_config: Mapping[str, str | int | float | bool]) -> Path:
    """Write run-config overrides as a TOML file for `flwr run --run-config FILE`."""
    lines = [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in run_config.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def submit_run(
    *, app_dir: Path, connection: str, run_config: Path, flwr_home: Path, log: Path | None
) -> FlowerProcess:
    """`flwr run APP CONNECTION --run-config FILE --stream`: submit the app and stream its logs until it ends."""
    argv = [
        flower_command("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config), "--stream",
    ]
    return start("flwr run", argv, log=log, env=flower_env(flwr_home), cwd=app_dir)
