"""The GPU cluster rehearsed on one machine (issue 22): cluster/fake.yaml's autoscaling fake nodes, the jobs
submitted with configs/fake_cluster.yaml (GPU requests, CPU arithmetic), everything shared on the S3 server.

The tests run in file order on one cluster (module scope) and one bucket: the encode job fills the store
the train job reads, whose checkpoint the scorer serves. Each kills a node under running work and checks
the result is whole. The measured times go to docs/cluster.md (printed with -s)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import REPO, REPORT_POLL_WAIT_S, S3Server, free_port
from fake_cluster import BIN, FakeCluster, start_fake_cluster, wait_until

from bahe_ray.fs import filesystem
from bahe_ray.store import EmbeddingStore

pytestmark = pytest.mark.slow
IDLE_TIMEOUT_S = 15  # cluster/fake.yaml's idle_timeout_minutes (0.25)


@pytest.fixture(scope="module")
def cluster(own_cluster_only: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    running = start_fake_cluster(tmp_path_factory.mktemp("fake-cluster"), IDLE_TIMEOUT_S)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def run(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bucket, the profile's overrides pointing into it, a local folder for summaries, and what the tests
    leave for the next ones (the trained checkpoint)."""
    bucket = s3_server.new_bucket()
    sets = [f"storage.endpoint_url={s3_server.endpoint}", f"data.prepared_path={bucket}/prepared",
            f"encoder.cache_dir={bucket}/encoders", f"store.path={bucket}/store", f"samples.path={bucket}/samples",
            f"train.output_dir={bucket}/train", f"serve.checkpoint={bucket}/train/best", f"rejects_path={bucket}/rejects"]
    return {"bucket": bucket, "sets": sets, "storage": s3_server.storage, "out": tmp_path_factory.mktemp("fake-out")}


@dataclass
class Job:
    """A `ray job submit` running in the background; it streams the job's log into `log` and exits with the job."""

    proc: subprocess.Popen
    log: Path

    def finished(self, timeout: float) -> None:
        self.proc.wait(timeout=timeout)
        out = self.log.read_text()
        assert self.proc.returncode == 0 and "succeeded" in out, out[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def submit(cluster: FakeCluster, script: str, run: dict[str, Any], *extra: str) -> Job:
    """`ray job submit -- python <script> --config configs/fake_cluster.yaml --set ...`. No --working-dir: the
    fake nodes share one disk, and a node stopped when idle deletes the shared copy of the job's working
    directory under the other nodes' workers; the project is installed in the venv every node runs (as
    cluster.yaml's setup commands install it on every node)."""
    flags = ["--config", str(REPO / "configs" / "fake_cluster.yaml"), *[a for s in run["sets"] for a in ("--set", s)],
             *extra]
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={cluster.address}", "--", "python", str(REPO / script),
           *flags]
    log = run["out"] / f"{Path(script).stem}.log"
    with open(log, "w") as out:
        return Job(subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT), log)


def actors_on(cluster: FakeCluster, class_part: str) -> list[str]:
    """Node ids of the alive actors whose class name contains `class_part` (one entry per actor)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000,
                         raise_on_missing_output=False)
    return [a.node_id for a in actors if class_part in a.class_name]


def figure(name: str, seconds: float) -> None:
    print(f"[fake cluster] {name}: {seconds:.1f} s")


@pytest.mark.timeout(900)  # the job prepares its inputs before any encoder starts: minutes on 2 loaded cores
def test_encode_job_scales_up_from_zero_and_survives_a_lost_node(cluster: FakeCluster, run: dict[str, Any]) -> None:
    assert cluster.nodes() == []  # 0 workers at start: everything below must scale out
    start = time.time()
    job = submit(cluster, "jobs/encode_behaviors.py", run, "--summary-json", str(run["out"] / "encode.json"))
    try:
        encoders = wait_until(lambda: actors_on(cluster, "EncodeAndWrite"), 600, "encoder actors running")
        figure("encode job submitted -> encoder actors running", time.time() - start)
        types = {node["node_id"]: node["type"] for node in cluster.nodes()}
        assert all(types[node] == "gpu-workers" for node in encoders), (encoders, types)  # their GPU request
        fs, root = filesystem(f"{run['bucket']}/store/parts", run["storage"])
        wait_until(lambda: fs.exists(root) and fs.ls(root, refresh=True), 120, "the first store part", every=0.3)
        # A node under an encoder actor dies while the actors write parts.
        lost, killed_at = encoders[0], time.time()
        cluster.kill_node(lost)
        wait_until(lambda: lost not in [n["node_id"] for n in cluster.nodes()], 120, "the lost node marked dead")
        job.finished(timeout=300)
        figure("node killed -> encode job finished", time.time() - killed_at)
    finally:
        job.stop()
    summary = json.loads((run["out"] / "encode.json").read_text())
    store = EmbeddingStore.read(f"{run['bucket']}/store", run["storage"])
    report = store.verify()
    assert report.ok, report.problems
    # Every atom stored exactly once: the store holds each unique atom, and no id twice (verify).
    assert summary["unique_atoms"] > 0 and summary["collisions"] == 0
    assert store.num_atoms == summary["unique_atoms"] == summary["encoded"]
    assert len(set(store.ids().tolist())) == store.num_atoms
    # And the fake GPU nodes go back to 0 once idle.
    idle_from = time.time()
    wait_until(lambda: "gpu-workers" not in cluster.node_types(), IDLE_TIMEOUT_S + 90, "gpu-workers nodes idle-stopped")
    figure("encode job finished -> gpu-workers back to 0", time.time() - idle_from)


@pytest.mark.timeout(900)  # the job builds its samples and reads its splits before the first epoch: minutes under load
def test_train_job_resumes_from_its_checkpoint_after_a_lost_node(cluster: FakeCluster, run: dict[str, Any]) -> None:
    if not (run["out"] / "encode.json").exists():
        pytest.skip("needs the store of the encode test")
    wait_until(lambda: "gpu-workers" not in cluster.node_types(), IDLE_TIMEOUT_S + 90, "gpu-workers at 0 first")
    start = time.time()
    job = submit(cluster, "jobs/train_ctr.py", run, "--report-json", str(run["out"] / "train.json"))
    try:
        wait_until(lambda: cluster.node_types().count("gpu-workers") == 2, 240, "two gpu-workers nodes for 2 workers")
        figure("train job submitted -> two gpu-workers nodes", time.time() - start)
        fs, root = filesystem(f"{run['bucket']}/train", run["storage"])
        # A node under a training worker dies once the first epoch's checkpoint is on S3.
        wait_until(lambda: fs.glob(f"{root}/*/epoch_*/checkpoint.json", refresh=True), 480, "epoch 1's checkpoint",
                   every=0.3)
        # Ray Train's controller takes a report when it next polls the workers (every 2 s): a node lost before
        # then loses the report, and the group starts over instead of resuming (tests/faults/test_fault_train.py).
        time.sleep(REPORT_POLL_WAIT_S)
        workers = actors_on(cluster, "RayTrainWorker")
        assert len(workers) == 2, workers
        killed_at = time.time()
        cluster.kill_node(workers[-1])
        job.finished(timeout=360)
        figure("node killed -> train job finished", time.time() - killed_at)
    finally:
        job.stop()
    report = json.loads((run["out"] / "train.json").read_text())
    assert report["restarts"] >= 1  # the group restarted ...
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, report["epochs"][-1]["epoch"] + 1))  # ... resumed
    assert len(report["epochs"]) == 3 and report["workers"] == 2
    assert fs.exists(f"{root}/best/model.safetensors") and 0.0 <= report["test"]["auc"] <= 1.0
    run["checkpoint"] = report["best_checkpoint"]


SCORE_BODY = {
    "behaviors": {"purchase": ["purchase: item 0000000 amber amber"], "search": ["search: item 0000001 basil amber"]},
    "candidates": [{"item_id": str(i), "text": f"purchase: item {i:07d} cedar amber"} for i in range(8)],
}


def scores(url: str) -> list[float]:
    response = httpx.post(url, json=SCORE_BODY, timeout=30)
    response.raise_for_status()
    return [s["score"] for s in response.json()["scores"]]


@pytest.mark.timeout(420)
def test_serve_replicas_on_two_nodes_agree_and_survive_a_lost_node(cluster: FakeCluster, run: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    if "checkpoint" not in run:
        pytest.skip("needs the checkpoint of the train test")
    port = free_port()
    # Two Scorers, each asking for a whole (logical) GPU: one per gpu-workers node. Ingress and AtomEncoder on CPU.
    deployments = [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                   {"name": "Scorer", "num_replicas": 2, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}},
                   {"name": "AtomEncoder", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}]
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "scorer", "import_path": "bahe_ray.serve:build_app", "route_prefix": "/",
                                "args": {"config": str(REPO / "configs" / "fake_cluster.yaml"), "overrides": run["sets"]},
                                "deployments": deployments}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "-a", cluster.address],
                            env=cluster.env, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    url = f"http://127.0.0.1:{port}/v1/score"
    try:
        start = time.time()
        wait_until(lambda: len(set(actors_on(cluster, "Scorer"))) == 2 and _answers(url), 300, "2 Scorers answering")
        figure("serve deploy -> 2 Scorers on 2 nodes answering", time.time() - start)
        # The same request, answered by both replicas (round robin over 20 requests), gives the same scores.
        answers = [scores(url) for _ in range(20)]
        assert max(abs(a - b) for answer in answers for a, b in zip(answer, answers[0])) < 1e-6
        # A node under one Scorer dies: requests keep being answered; errors only while the replica moves.
        lost = actors_on(cluster, "Scorer")[0]
        killed_at, errors, ok_since = time.time(), 0, None
        cluster.kill_node(lost)
        while time.time() - killed_at < 240:
            try:
                assert scores(url) == pytest.approx(answers[0], abs=1e-6)
                ok_since = ok_since or time.time()
            except httpx.HTTPError:
                errors, ok_since = errors + 1, None
            if ok_since and len(set(actors_on(cluster, "Scorer")) - {lost}) == 2:
                break
            time.sleep(0.2)
        assert ok_since is not None and len(set(actors_on(cluster, "Scorer")) - {lost}) == 2, "no second Scorer back"
        figure("node killed -> 2 Scorers again", time.time() - killed_at)
        print(f"[fake cluster] failed requests while the replica moved: {errors}")
        assert errors <= 10
        assert all(scores(url) == pytest.approx(answers[0], abs=1e-6) for _ in range(20))  # none after
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-a", cluster.address, "-y"], env=cluster.env,
                       capture_output=True, timeout=120)
    idle_from = time.time()
    wait_until(lambda: not cluster.nodes(), IDLE_TIMEOUT_S + 90, "every worker node idle-stopped")
    figure("serve shutdown -> 0 worker nodes", time.time() - idle_from)


def _answers(url: str) -> bool:
    try:
        scores(url)
        return True
    except httpx.HTTPError:
        return False
