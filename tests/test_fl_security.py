"""A TLS SuperLink with SuperNode authentication on loopback: who gets in and who does not.

One SuperLink (TLS + `--enable-supernode-auth`) serves the module: a registered hospital connects and
trains a tiny round; a SuperNode with an unregistered key is refused; a plaintext SuperNode never gets
through. Every process is stopped (whole process trees) at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fl_support import leftovers, make_hospital, tiny_settings

from federimed.checkpoints import METRICS
from federimed.fl import deployment
from federimed.fl.settings import ServerOptions
from federimed.security.certs import SiteKey, TlsFiles, create_site_key, create_tls

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # minutes when alone; far more on a busy box

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "secure"


class SecureFederation:
    """A TLS + node-auth SuperLink with its CA, site keys and the processes started against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.flwr_home = root / "flwr-home"
        self.port = deployment.free_port()
        self.tls: TlsFiles = create_tls(root / "tls")
        self.processes: list[deployment.FlowerProcess] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.processes.append(deployment.start_superlink(
            port=self.port, flwr_home=self.flwr_home, log=self.root / "superlink.log", tls=self.tls, auth=True,
        ))
        deployment.add_connection(self.flwr_home, CONNECTION, self.address, root_certificates=self.tls.ca_cert)

    def node(self, name: str, *, key: SiteKey | None, tls: bool = True, wait: bool = True) -> deployment.FlowerProcess:
        process = deployment.start_supernode(
            name=f"supernode {name}", superlink=self.address, data_path=make_hospital(self.root / "data", name, 4),
            port=deployment.free_port(), flwr_home=self.flwr_home, log=self.root / f"{name}.log",
            root_certificates=self.tls.ca_cert if tls else None, auth_key=key.private if key else None,
            wait=wait,
        )
        self.processes.append(process)
        return process

    def online_nodes(self) -> dict[int, str]:
        """Node id → status, as `flwr supernode ls` reports it."""
        listed = subprocess.run(
            [deployment.flower_command("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
            env=deployment.flower_env(self.flwr_home), capture_output=True, text=True, timeout=300, check=False,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(30)}" for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFederation]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        fed = SecureFederation(tmp_path_factory.mktemp("secure"))
        try:
            fed.start()
            yield fed
        finally:
            fed.close()
        assert leftovers(fed.flwr_home) == []


def _wait(condition, timeout: float, what: str, fed: SecureFederation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s:\n{fed.logs()}"
        time.sleep(1)


def test_a_registered_hospital_connects_over_tls_and_trains_a_round(federation: SecureFederation) -> None:
    key = create_site_key(federation.root / "keys", "alpha")
    node_id = deployment.register_supernode(federation.flwr_home, CONNECTION, key.public, name="alpha")
    federation.node("alpha", key=key)
    _wait(lambda: federation.online_nodes().get(node_id) == "online", 600, "alpha did not come online", federation)

    runs = federation.root / "runs"
    options = ServerOptions(  # no held-out scoring: one ClientApp start fewer
        settings=tiny_settings(rounds=1, steps=1), hospitals=1, runs_dir=runs, fraction_evaluate=0.0
    )
    config = deployment.write_run_config(federation.root / "run-config.toml", options.to_run_config())
    run = deployment.submit_run(
        app_dir=APP_DIR, connection=CONNECTION, run_config=config, flwr_home=federation.flwr_home,
        log=federation.root / "flwr-run.log",
    )
    federation.processes.append(run)
    assert run.wait(2400) == 0, federation.logs()
    [run_dir] = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    metrics = json.loads((run_dir / "round-1" / METRICS).read_text())
    assert list(metrics["hospitals"]) == ["alpha"] and metrics["hospitals"]["alpha"]["node_id"] == node_id
    assert "SuperNode authentication is disabled" not in (federation.root / "superlink.log").read_text()


def test_a_supernode_with_an_unregistered_key_is_refused(federation: SecureFederation) -> None:
    stranger = create_site_key(federation.root / "keys", "mallory")
    node = federation.node("mallory", key=stranger, wait=False)
    assert node.wait(600) != 0, federation.logs()
    assert "Failed to activate SuperNode" in node.tail(40)


def test_a_plaintext_supernode_cannot_talk_to_the_tls_superlink(federation: SecureFederation) -> None:
    before = set(federation.online_nodes())
    node = federation.node("plain", key=None, tls=False)
    _wait(lambda: node.tail(40).count("Connection attempt failed") >= 2, 600, "no failed attempts", federation)
    assert node.alive() and set(federation.online_nodes()) == before  # it keeps retrying, never admitted
