"""The cluster workflow of the README, for real: `ray start --head` on 127.0.0.1, `ray job submit`
of the encode job and the train job, `serve deploy` of the scorer, a score over HTTP, then the
daily-update job (only the new day's atoms encoded, training warm-started from the last best)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, free_port, wait_for_port, write_movielens_subset

from bahe_ray.store import EmbeddingStore

BIN = Path(sys.executable).parent
USERS = 5


@pytest.fixture(scope="module")
def head(own_cluster_only: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1, started like a user would; stopped (only this one) afterwards."""
    # As a user with the venv activated: the jobs' `python` is this environment's interpreter.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    temp = Path("/tmp") / f"ray-wf-{os.getpid()}"
    # Every port is chosen free: the test session's own Ray already holds the default agent ports,
    # and a head whose job agent cannot bind refuses every submission.
    ports = {name: free_port() for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           *[f"--{name}={port}" for name, port in ports.items()],
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats"]
    # --block keeps the head in its own process group, so teardown stops exactly this cluster
    # (`ray stop` would stop every Ray instance of the user, the test session's own included).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dash, timeout=180)
        yield {"address": f"http://127.0.0.1:{dash}", **env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def submit(env: dict[str, str], script: str, args: list[str]) -> None:
    """`ray job submit --working-dir <repo> -- python <script> <args>`; fails the test with the job's log."""
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={env['address']}", "--working-dir", str(REPO),
           "--", "python", script, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.timeout(1500)  # five job submissions and a deploy: past 900 s at load average 19 on 2 cores
def test_job_submit_train_serve_deploy_and_daily_update(head: dict[str, str], tmp_path: Path) -> None:
    files = write_movielens_subset(tmp_path / "logs", USERS)
    out = tmp_path / "out"
    sets = ["data.source=files", f"data.events_path={files['events']}", f"data.impressions_path={files['impressions']}",
            f"store.path={out / 'store'}", f"samples.path={out / 'samples'}", f"train.output_dir={out / 'train'}",
            f"rejects_path={out / 'rejects'}", "train.max_epochs=1", "train.max_train_samples=64",
            "train.cpus_per_worker=1"]  # the deployed scorer keeps 1.6 of the head's 4 CPUs
    flags = ["--config", "configs/local.yaml", *[arg for s in sets for arg in ("--set", s)]]

    submit(head, "jobs/encode_behaviors.py", [*flags, "--summary-json", str(out / "encode.json")])
    encoded = json.loads((out / "encode.json").read_text())
    assert encoded["encoded"] == encoded["unique_atoms"] > 0

    submit(head, "jobs/train_ctr.py", [*flags, "--report-json", str(out / "train.json")])
    trained = json.loads((out / "train.json").read_text())
    best = Path(trained["best_checkpoint"])
    assert (best / "model.safetensors").exists() and 0.0 <= trained["test"]["auc"] <= 1.0

    port = free_port()
    serve_config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "scorer", "import_path": "bahe_ray.serve:build_app", "route_prefix": "/",
            "args": {"config": str(REPO / "configs" / "local.yaml"), "overrides": [*sets, f"serve.checkpoint={best}"]},
        }],
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", head["address"]],
                            env=head, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    body = {"behaviors": {"liked": ["rated 5/5: Toy Story (1995) | Animation, Children's, Comedy"], "disliked": []},
            "candidates": [{"item_id": "1", "text": "Toy Story (1995) | Animation, Children's, Comedy"},
                           {"item_id": "x", "text": "A Film Nobody Encoded (2031) | Drama"}]}
    deadline, response = time.time() + 300, None
    while time.time() < deadline:
        try:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/score", json=body, timeout=60)
            if response.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert response is not None and response.status_code == 200, response and response.text
    scores = response.json()["scores"]
    assert [s["item_id"] for s in scores] == ["1", "x"] and all(0 < s["score"] < 1 for s in scores)

    # A new day: five behaviours never seen before, and an impression for one of them.
    day = tmp_path / "day"
    (day / "events").mkdir(parents=True)
    (day / "impressions").mkdir()
    new_texts = [f"rated 4/5: Tomorrow's Film {i} (2031) | Drama" for i in range(5)]
    pq.write_table(pa.table({"user_id": ["1"] * 5, "ts": [893_000_000 + i for i in range(5)], "field": ["liked"] * 5,
                             "text": new_texts}), day / "events" / "part-0.parquet")
    pq.write_table(pa.table({"user_id": ["1"], "ts": [893_000_010], "item_id": ["9999"],
                             "item_text": ["Tomorrow's Film 0 (2031) | Drama"], "label": [1]}),
                   day / "impressions" / "part-0.parquet")
    for name in ("events", "impressions"):  # the full logs now include the new day
        (Path(files[name]) / "part-1.parquet").write_bytes((day / name / "part-0.parquet").read_bytes())
    before = EmbeddingStore.read(str(out / "store")).num_atoms
    submit(head, "jobs/daily_update.py", [*flags, "--day-events", str(day / "events"),
                                          "--day-impressions", str(day / "impressions"),
                                          "--report-json", str(out / "daily.json")])
    daily = json.loads((out / "daily.json").read_text())
    assert daily["encode"]["new_atoms"] == daily["encode"]["encoded"] == 6  # 5 behaviours + the new item
    assert EmbeddingStore.read(str(out / "store")).num_atoms == before + 6
    assert daily["warm_start"] and Path(daily["warm_start"]).name.startswith("previous-")
