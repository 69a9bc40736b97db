"""Start, watch and stop Flower deployment processes (SuperLink, SuperNodes, `flwr run`).

Every process starts in its own session (process group) with its output in a log file, and `stop()`
signals the group and every descendant: a SuperNode's or SuperLink's `flower-superexec` children outlive
a SIGTERM to their parent otherwise (the SuperLink even starts its superexec in a new session).
In Flower 1.42 a SuperLink serves the Fleet, Control and Runtime APIs on one
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from federimed.memory import with_allocator

if TYPE_CHECKING:
    from federimed.fl.settings import ServerOptions
    from federimed.security.certs import TlsFiles

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
        """SIGTERM this process, its group and every descendant (some start their own session, as the
        SuperLink's `flower-superexec` does), then SIGKILL whatever is left after `grace` seconds."""
        known = set(descendants(self.popen.pid)) | ({self.popen.pid} if self.popen.poll() is None else set())
        for pid in known:
            _signal(pid, signal.SIGTERM)
        _signal_group(self.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.popen.poll()  # reap our own child
            fresh = {d for pid in known if _running(pid) for d in descendants(pid)} - known
            for pid in fresh:
                _signal(pid, signal.SIGTERM)
            known |= fresh
            if not any(_running(pid) for pid in known | set(group_members(self.popen.pid))):
                return
            time.sleep(0.1)
        for pid in known | set(group_members(self.popen.pid)):
            _signal(pid, signal.SIGKILL)
        self.popen.wait()

    def processes(self) -> list[int]:
        """Pids of this process and all its descendants that are still running."""
        return [p for p in [self.popen.pid, *descendants(self.popen.pid)] if _running(p)]


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); empty if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _table() -> dict[int, list[str]]:
    return {int(e.name): f for e in Path("/proc").iterdir() if e.name.isdigit() and (f := _stat(int(e.name)))}


def descendants(pid: int) -> list[int]:
    """Pids of all live descendants of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for child, fields in _table().items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def group_members(group: int) -> list[int]:
    """Pids of the live processes in process group `group` (Linux /proc)."""
    return [pid for pid, fields in _table().items() if int(fields[2]) == group and fields[0] not in ("Z", "X")]


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
    env = dict(os.environ) | {"FLWR_HOME": str(Path(flwr_home).resolve()), "PYTHONUNBUFFERED": "1"}
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


def start_superlink(
    *,
    port: int,
    flwr_home: Path,
    log: Path | None,
    host: str = LOOPBACK,
    tls: TlsFiles | None = None,
    auth: bool = False,
) -> FlowerProcess:
    """Start a SuperLink (Fleet, Control and Runtime APIs on `host:port`) and wait until it listens.

    Without `tls` it is insecure (plaintext). With `tls` every API is served over TLS with the server
    certificate; `auth` (needs `tls`) admits only SuperNodes whose public key was registered
    (`register_supernode`). Runtime dependency installation is off: by default Flower 1.42 runs
    `uv sync` on the app's pyproject for every ServerApp, which would reinstall torch & co.
    """
    if auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)")
    security = ["--insecure"] if tls is None else [
        "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
    ]
    argv = [
        flower_command("flower-superlink"), *security, *(["--enable-supernode-auth"] if auth else []),
        "--host", host, "--port", str(port), "--disable-runtime-dependency-installation",
    ]
    process = start("superlink", argv, log=log, env=flower_env(flwr_home))
    _await_port(process, host if host != "0.0.0.0" else LOOPBACK, port)
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
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    wait: bool = True,
    threads: int | None = None,
) -> FlowerProcess:
    """Start a SuperNode for one hospital; its ClientApp reads `data_path` (node config).

    `threads` caps its ClientApps' CPU threads (OMP_NUM_THREADS): hospitals that share one machine would
    otherwise oversubscribe its cores, which slows every one of them several times over.
    With `root_certificates` (the federation's CA certificate) it talks TLS to the SuperLink and refuses
    a server that CA did not sign; without, plaintext. `auth_key` (needs TLS) is the hospital's private
    key for SuperNode authentication. `wait`: block until its local ClientApp API port listens.
    """
    if auth_key is not None and root_certificates is None:
        raise ValueError("SuperNode authentication needs TLS: pass root_certificates with auth_key")
    config = {"data-path": str(Path(data_path).resolve())} | ({"outbox": str(Path(outbox).resolve())} if outbox else {})
    security = ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    argv = [
        flower_command("flower-supernode"), *security, "--superlink", superlink,
        *(["--auth-supernode-private-key", str(auth_key)] if auth_key else []),
        "--host", LOOPBACK, "--port", str(port), "--node-config", node_config_arg(config),
    ]
    limit = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    process = start(name, argv, log=log, env=with_allocator(flower_env(flwr_home, limit)))
    if wait:
        _await_port(process, LOOPBACK, port)
    return process


def _await_port(process: FlowerProcess, host: str, port: int) -> None:
    """`wait_for_port`, stopping the process (and its children) when it does not come up."""
    try:
        wait_for_port(process, host, port)
    except FlowerProcessError:
        process.stop()
        raise


def add_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Write SuperLink connection `name` → `address` into FLWR_HOME/config.toml (as default): TLS verified
    with `root_certificates` (the CA certificate) when given, else insecure."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        "insecure = true" if root_certificates is None
        else f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def register_supernode(flwr_home: Path, connection: str, public_key: Path, name: str | None = None) -> int:
    """`flwr supernode register KEY CONNECTION`: admit a hospital's public key; return its node id."""
    argv = [flower_command("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]
    done = subprocess.run(
        [*argv, *(["--name", name] if name else [])], env=flower_env(flwr_home), capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=300, check=False,
    )
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode or not reply.get("success"):
        raise FlowerProcessError(
            f"could not register {public_key} with SuperLink {connection!r}:\n{(done.stdout + done.stderr).strip()}"
        )
    return int(reply["node-id"])


def write_run_config(path: Path, run_config: Mapping[str, str | int | float | bool]) -> Path:
    """Write run-config overrides as a TOML file for `flwr run --run-config FILE`."""
    lines = [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in run_config.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def submit_run(
    *, app_dir: Path, connection: str, run_config: Path, flwr_home: Path, log: Path | None
) -> FlowerProcess:
    """`flwr run APP CONNECTION --run-config FILE --stream`: submit the app and stream its logs until it ends.
    `flwr run` starts inside APP, so the paths it is handed are absolute."""
    app_dir = Path(app_dir).resolve()
    argv = [
        flower_command("flwr"), "run", str(app_dir), connection, "--run-config", str(Path(run_config).resolve()),
        "--stream",
    ]
    return start("flwr run", argv, log=log, env=flower_env(flwr_home), cwd=app_dir)


def new_federated_run(runs_dir: Path, before: set[str]) -> Path | None:
    """The federated run that appeared in `runs_dir` since it held the runs named in `before` (baselines
    may be training into the same folder meanwhile), or None while there is none."""
    for info in sorted(runs_dir.glob("*/run.json")):
        if info.parent.name not in before and json.loads(info.read_text())["mode"] == "federated":
            return info.parent
    return None


def loopback_home(options: ServerOptions) -> Path:
    """FLWR_HOME and logs of a loopback federation: RUNS_DIR/.flower/local for training, .flower/cohort
    for cohort statistics (the two may run side by side)."""
    return options.runs_dir / ".flower" / ("local" if options.task == "train" else options.task)


@contextmanager
def loopback_federation(
    hospitals: Sequence[Path], options: ServerOptions, app_dir: Path, tls: TlsFiles | None = None
) -> Iterator[FlowerProcess]:
    """A whole federation on this machine: a SuperLink, one SuperNode per hospital (node config
    `data-path`, exactly as in a real deployment) and `flwr run` of `options`, which it yields. With `tls`
    every connection is TLS (SuperNodes and `flwr run` verify the SuperLink with its CA). Logs and
    FLWR_HOME live in `loopback_home(options)`; every process is stopped on the way out."""
    home = loopback_home(options)
    processes: list[FlowerProcess] = []
    try:
        port = free_port()
        processes.append(start_superlink(port=port, flwr_home=home, log=home / "superlink.log", tls=tls))
        ca = tls.ca_cert if tls else None
        add_connection(home, "hospitals", f"{LOOPBACK}:{port}", root_certificates=ca)
        threads = max(1, (os.cpu_count() or 1) // len(hospitals))  # the hospitals share this machine's cores
        for hospital in hospitals:
            processes.append(
                start_supernode(
                    name=f"hospital {hospital.name}", superlink=f"{LOOPBACK}:{port}", data_path=hospital,
                    port=free_port(), flwr_home=home, log=home / f"{hospital.name}.log", threads=threads,
                    root_certificates=ca,
                )
            )
        config = write_run_config(home / "run-config.toml", options.to_run_config())
        run = submit_run(app_dir=app_dir, connection="hospitals", run_config=config, flwr_home=home,
                         log=home / "flwr-run.log")
        processes.append(run)
        yield run
        if run.popen.returncode:
            raise FlowerProcessError(f"the Flower run failed (exit {run.popen.returncode}):\n{run.tail()}\nlogs: {home}")
    finally:
        for process in reversed(processes):
            process.stop()


def federate_on_loopback(
    hospitals: Sequence[Path],
    options: ServerOptions,
    app_dir: Path,
    on_round: Callable[[dict], None] | None = None,
    tls: TlsFiles | None = None,
) -> Path:
    """Train a federation on this machine (`loopback_federation`); `on_round` gets each round's
    metrics.json as its checkpoint appears. Returns the run directory."""
    before = {p.name for p in options.runs_dir.iterdir()} if options.runs_dir.is_dir() else set()
    run_dir: Path | None = options.runs_dir / options.resume_run if options.resume_run else None
    shown: set[Path] = set()
    with loopback_federation(hospitals, options, app_dir, tls) as run:
        while True:
            finished = not run.alive()
            run_dir = run_dir or new_federated_run(options.runs_dir, before)
            rounds = run_dir.glob("round-*/metrics.json") if run_dir else []
            for path in sorted(rounds, key=lambda p: int(p.parent.name.removeprefix("round-"))):
                if path not in shown:
                    shown.add(path)
                    if on_round is not None:
                        on_round(json.loads(path.read_text()))
            if finished:
                break
            time.sleep(2)
    if run_dir is None or not shown:
        raise FlowerProcessError(f"the federated run saved no checkpoint; logs: {loopback_home(options)}")
    return run_dir


def cohort_on_loopback(hospitals: Sequence[Path], options: ServerOptions, app_dir: Path) -> Path:
    """Gather the hospitals' cohort statistics through Flower on this machine; returns the artefact."""
    from federimed.cohort import ARTEFACT

    before = set(options.runs_dir.glob(f"cohort-*/{ARTEFACT}"))
    options = options.model_copy(update={"task": "cohort"})
    with loopback_federation(hospitals, options, app_dir) as run:
        while run.alive():
            time.sleep(1)
    made = sorted(set(options.runs_dir.glob(f"cohort-*/{ARTEFACT}")) - before)
    if not made:
        raise FlowerProcessError(f"the cohort run wrote no artefact; logs: {loopback_home(options)}")
    return made[-1]
