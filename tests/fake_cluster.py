"""A fake multi-node autoscaling cluster (cluster/fake.yaml) started the way docs/cluster.md tells a
user to, on free ports: its nodes are local raylets that the autoscaler adds on demand and removes
when idle. Used by tests/test_fake_cluster.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO, free_port, wait_for_port

BIN = Path(sys.executable).parent


@dataclass
class FakeCluster:
    """A running head (`proc`, its own process group) and what it takes to talk to it."""

    proc: subprocess.Popen
    address: str  # the dashboard: `ray job submit --address`, `serve deploy -a`, the state API
    env: dict[str, str]  # the environment of a user's shell: the jobs' `python` is this venv's

    def nodes(self) -> list[dict[str, Any]]:
        """The alive worker nodes: node_id, the node type (from its resources) and its resources."""
        from ray.util.state import list_nodes

        alive = [n for n in list_nodes(address=self.address, limit=100, raise_on_missing_output=False)
                 if n.state == "ALIVE" and not n.is_head_node]
        return [{"node_id": n.node_id, "type": "gpu-workers" if n.resources_total.get("GPU") else "cpu-workers",
                 "resources": n.resources_total} for n in alive]

    def node_types(self) -> list[str]:
        return sorted(node["type"] for node in self.nodes())

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's raylet (the parent of its worker processes): its workers die with it, as on a lost
        machine."""
        from ray.util.state import list_workers

        workers = list_workers(address=self.address, filters=[("node_id", "=", node_id), ("is_alive", "=", True)],
                               detail=True, raise_on_missing_output=False)
        pids = {parent_pid(w.pid) for w in workers if w.worker_type == "WORKER"}
        assert len(pids) == 1, f"node {node_id}: raylet not found from its workers ({pids})"
        os.kill(pids.pop(), signal.SIGKILL)

    def stop(self) -> None:
        """Stop the head and every fake node (they are in the head's process group)."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        time.sleep(2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the group left behind
        except ProcessLookupError:
            pass


def parent_pid(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def start_fake_cluster(temp: Path, idle_timeout_s: float) -> FakeCluster:
    """`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster/fake.yaml`, the head with 0 CPUs, every
    port chosen free (the test session's own Ray and other users' hold the defaults)."""
    gcs = free_port()
    config = yaml.safe_load((REPO / "cluster" / "fake.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    config["idle_timeout_minutes"] = idle_timeout_s / 60
    temp.mkdir(parents=True, exist_ok=True)
    (temp / "fake.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ray_temp = Path("/tmp") / f"ray-fake-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    ports = {name: free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           *[f"--{name}={port}" for name, port in ports.items()], "--num-cpus=0", "--num-gpus=0",
           f"--autoscaling-config={temp / 'fake.yaml'}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--object-store-memory=300000000", f"--temp-dir={ray_temp}",
           "--disable-usage-stats"]
    log = open(temp / "head.log", "ab")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    cluster = FakeCluster(proc, f"http://127.0.0.1:{dash}", {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"})
    try:
        wait_for_port(dash, timeout=180)
    except TimeoutError:
        cluster.stop()
        raise
    return cluster


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    """Poll `condition` until it returns something truthy (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")
