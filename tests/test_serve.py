"""The Ray Serve scorer over real HTTP on 127.0.0.1, with a real checkpoint (MiniLM BaheCTR, random head).

One app for the module: scores and their order, served == offline evaluation (including atoms
the store lacks, encoded online), a table of malformed requests (4xx naming the field, good
requests still answered), load shedding (503 + Retry-After), a killed Scorer replica, and a
user_config rollout of a second checkpoint while requests flow.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO, free_port

from bahe_ray import bench
from bahe_ray.atoms import atom_ids, normalize_text
from bahe_ray.bench import run_serve_benchmark
from bahe_ray.checkpoint import CheckpointMeta, build_model, save_checkpoint
from bahe_ray.config import Config, load_config
from bahe_ray.data import movielens
from bahe_ray.encoders import build_encoder
from bahe_ray.samples import hist_column, sample_schema
from bahe_ray.serve import APP_NAME, AtomEncoder, load_scorer_state, scorer_app
from bahe_ray.serve.batch import Prepared, score_batch
from bahe_ray.store import EmbeddingStore, FingerprintMismatchError
from bahe_ray.train import evaluate_checkpoint

PROFILE = REPO / "configs" / "local.yaml"
FIELDS = ["liked", "disliked"]
N = 8  # the checkpoint's max_behaviors: requests with more keep the most recent 8
# Small Scorer capacity so a modest burst overflows it (load-shedding test).
SCORER_OPTIONS = {"max_ongoing_requests": 8, "max_queued_requests": 8}


@dataclass
class World:
    cfg: Config
    overrides: list[str]  # cfg is configs/local.yaml with these
    fingerprint: str  # the store's encoder fingerprint id
    checkpoints: list[str]
    versions: list[str]
    stored: dict[str, list[str]]  # field -> behaviour texts in the store; "items" -> item texts
    unseen: dict[str, list[str]]  # the same, texts the store lacks


def _texts(rows: list[dict[str, Any]], column: str, keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    """Distinct normalised texts of the kept rows, in first-seen order."""
    return list(dict.fromkeys(normalize_text(r[column]) for r in rows if keep(r)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> World:
    """Store of real MovieLens atoms (users 1-2) encoded by MiniLM k=2, two BAHE checkpoints on it."""
    tmp = tmp_path_factory.mktemp("serve")
    overrides = [
        f"store.path={tmp / 'store'}", f"samples.path={tmp / 'samples'}", f"samples.max_behaviors={N}",
        f"serve.checkpoint={tmp / 'ckpt-a'}", "serve.max_candidates=50", "serve.max_behaviors_per_field=20",
        "serve.max_text_chars=300", "serve.max_request_bytes=20000", "model.head_hidden=[32]",
        "store.reader.refresh_s=0.5",
    ]
    cfg = load_config(PROFILE, overrides)
    tables = movielens.to_tables(movielens.load_ratings(None, REPO / "outputs" / "cache"), max_users=3)
    events, impressions = (t.to_pylist() for t in tables)
    old = {"1", "2"}
    stored = {f: _texts(events, "text", lambda r: r["user_id"] in old and r["field"] == f) for f in FIELDS}
    stored["items"] = _texts(impressions, "item_text", lambda r: r["user_id"] in old)
    everything = {t for texts in stored.values() for t in texts}
    unseen = {f: _texts(events, "text", lambda r: r["field"] == f) for f in FIELDS}
    unseen["items"] = _texts(impressions, "item_text", lambda r: True)
    unseen = {k: [t for t in texts if t not in everything] for k, texts in unseen.items()}

    encoder = build_encoder(cfg.encoder, "cpu")
    texts = sorted(everything)
    store = EmbeddingStore.open(cfg.store.path, encoder.fingerprint, encoder.dim)
    store.add(atom_ids(texts), encoder.encode(texts), texts)
    store.commit()

    checkpoints, versions = [], []
    for seed, name in enumerate(["ckpt-a", "ckpt-b"]):
        torch.manual_seed(seed)
        model = build_model("bahe", cfg)
        meta = CheckpointMeta(
            model_kind="bahe", config=cfg.model_dump(mode="json"), fields=FIELDS, max_behaviors=N,
            dim=encoder.dim, encoder_fingerprint=encoder.fingerprint.model_dump(mode="json"),
            encoder_fingerprint_id=encoder.fingerprint.id, store_path=cfg.store.path,
        )
        written = save_checkpoint(str(tmp / name), model, meta)
        checkpoints.append(str(tmp / name))
        versions.append(written.model_sha256[:16])
    return World(cfg, overrides, encoder.fingerprint.id, checkpoints, versions, stored, unseen)


def serve_run(world: World, folder: Path, scorer: dict[str, Any]) -> None:
    """`serve run CONFIG --non-blocking` (a declarative deploy, as `serve deploy`) against the test's Ray.

    The config is serve_configs/local.yaml's application with the test profile and `scorer`
    options for the Scorer deployment.
    """
    import ray

    config = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    (app,) = config["applications"]
    app["args"] = {"config": str(PROFILE), "overrides": world.overrides}
    for deployment in app["deployments"]:
        if deployment["name"] == "Scorer":
            deployment.update(SCORER_OPTIONS, **scorer)
    path = folder / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray.get_runtime_context().gcs_address
    serve_cli = Path(sys.executable).with_name("serve")
    command = [str(serve_cli), "run", str(path), "-a", address, "--non-blocking"]
    subprocess.run(command, check=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def url(ray_local: None, world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The scorer app on a free loopback port, deployed from serve_configs/local.yaml (started once)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_run(world, tmp_path_factory.mktemp("serve-configs"), {})

    def running() -> bool:
        app = serve.status().applications.get(APP_NAME)
        assert app is None or app.status != ApplicationStatus.DEPLOY_FAILED, app.message
        return app is not None and app.status == ApplicationStatus.RUNNING

    wait_for(running, timeout=300)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def good_request(world: World, seed: int = 0, candidates: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pick = lambda texts, k: [texts[i] for i in rng.choice(len(texts), k, replace=False)]  # noqa: E731
    items = pick(world.stored["items"], candidates)
    return {
        "behaviors": {"liked": pick(world.stored["liked"], 5), "disliked": pick(world.stored["disliked"], 3)},
        "candidates": [{"item_id": f"i{j}", "text": t} for j, t in enumerate(items)],
        "request_id": f"good-{seed}",
    }


def score(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---- API --------------------------------------------------------------------------------------


def test_model_info_health_and_openapi(client: httpx.Client, world: World) -> None:
    info = client.get("/v1/model").json()
    assert info["kind"] == "bahe" and info["fields"] == FIELDS and info["max_behaviors"] == N
    assert info["version"] == world.versions[0] and info["checkpoint"] == world.checkpoints[0]
    assert info["store_version"] == 1 and info["dim"] == 384
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "ScoreRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_scores_follow_candidate_order(client: httpx.Client, world: World) -> None:
    body = good_request(world, candidates=6)
    out = score(client, body)
    assert [s["item_id"] for s in out["scores"]] == [c["item_id"] for c in body["candidates"]]
    assert out["request_id"] == body["request_id"] and out["model_version"] == world.versions[0]
    assert out["atoms_encoded"] == 0
    values = np.array([s["score"] for s in out["scores"]])
    assert ((values > 0) & (values < 1)).all() and np.ptp(values) > 1e-4  # distinct items, distinct scores
    reversed_body = {**body, "candidates": body["candidates"][::-1]}
    again = np.array([s["score"] for s in score(client, reversed_body)["scores"]])
    np.testing.assert_allclose(again[::-1], values, atol=1e-6)
    other_user = {**body, "behaviors": {"liked": body["behaviors"]["disliked"], "disliked": body["behaviors"]["liked"]}}
    assert np.abs(np.array([s["score"] for s in score(client, other_user)["scores"]]) - values).max() > 1e-5


def test_scorer_past_the_shard_threshold_reads_shard_actors(ray_local: None, world: World) -> None:
    """store.reader.shard_above_gb below the store's vector bytes: the loaded scorer looks vectors up in
    ceil(bytes / threshold) shard actors and scores as the scorer on the mapped store does."""
    store = EmbeddingStore.read(world.cfg.store.path)
    cfg = world.cfg.model_copy(deep=True)
    cfg.store.reader.shard_above_gb = store.num_atoms * store.dim * np.dtype(store.dtype).itemsize / 1e9 / 1.5
    mapped = load_scorer_state(world.checkpoints[0], world.cfg, world.fingerprint)
    sharded = load_scorer_state(world.checkpoints[0], cfg, world.fingerprint)
    assert mapped.sharded is None and sharded.sharded is not None and len(sharded.sharded.actors) == 2
    s = world.stored
    histories = [(atom_ids(s["liked"][:N]), atom_ids(s["disliked"][:3])), (atom_ids(s["liked"][3:5]), [])]
    items = atom_ids(s["items"][:4]).tolist()
    empty = np.zeros(0, np.int64), np.zeros((0, store.dim), np.float32)

    def scores(loaded: Any) -> np.ndarray:
        requests = [Prepared(loaded, [tuple(map(int, h)) for h in user], items, *empty) for user in histories]
        return np.concatenate([r.scores for r in score_batch(requests)])

    np.testing.assert_allclose(scores(sharded), scores(mapped), atol=1e-5, rtol=0)


def test_scorer_serving_http_itself_answers_as_the_ingress_app(ray_local: None, url: str, client: httpx.Client,
                                                               world: World) -> None:
    """serve.ingress: scorer (no Ingress deployment, the Scorer replica parses HTTP): the same scores, the same
    error bodies, the same model, beside the module's app under another route prefix."""
    from ray import serve

    cfg = load_config(PROFILE, [*world.overrides, "serve.ingress=scorer"])
    serve.run(scorer_app(cfg), name="scorer-http", route_prefix="/in-scorer", blocking=False)
    try:
        with httpx.Client(base_url=f"{url}/in-scorer", timeout=60) as fused:
            assert fused.get("/v1/model").json()["version"] == client.get("/v1/model").json()["version"]
            for seed in range(3):
                body = good_request(world, 10 + seed, candidates=5)
                a, b = score(client, body), score(fused, body)
                np.testing.assert_allclose([x["score"] for x in b["scores"]], [x["score"] for x in a["scores"]],
                                           atol=1e-6, rtol=0)
                assert b["timings"]["ingress_ms"] >= b["timings"]["scorer_ms"] > 0
            bad = {**good_request(world), "candidates": [{"item_id": "x", "atom_id": "12"}]}
            answers = [c.post("/v1/score", json=bad) for c in (client, fused)]
            assert [r.status_code for r in answers] == [422, 422] and answers[0].json() == answers[1].json()
        deployments = serve.status().applications["scorer-http"].deployments
        assert set(deployments) == {"Scorer", "AtomEncoder"}
    finally:
        serve.delete("scorer-http")


# ---- served == offline ----------------------------------------------------------------------


def test_served_scores_equal_offline_evaluation(client: httpx.Client, world: World, tmp_path: Path) -> None:
    """Requests (long histories, atom ids, an empty field, unseen behaviours and items) scored
    online and by evaluate_checkpoint on the same rows, after the unseen atoms were encoded offline."""
    s, u = world.stored, world.unseen
    requests = [
        good_request(world, 1, candidates=4),
        {  # 15 liked (model keeps the last 8), disliked as atom ids, one unseen candidate item
            "behaviors": {"liked": s["liked"][:15]},
            "behavior_ids": {"disliked": atom_ids(s["disliked"][:4]).tolist()},
            "candidates": [{"item_id": "old", "atom_id": int(atom_ids(s["items"][:1])[0])},
                           {"item_id": "new", "text": u["items"][0]}],
        },
        {  # unseen behaviours in both fields, mixed with stored ones; no request_id
            "behaviors": {"liked": [u["liked"][0], s["liked"][3], u["liked"][1]], "disliked": [u["disliked"][0]]},
            "candidates": [{"item_id": "a", "text": s["items"][5]}, {"item_id": "b", "text": u["items"][1]}],
        },
        {"candidates": [{"item_id": "cold", "text": s["items"][7]}]},  # no behaviours at all
    ]
    served = [score(client, body) for body in requests]
    assert [r["atoms_encoded"] for r in served] == [0, 1, 4, 0]
    warm = [score(client, body) for body in requests]  # the same requests again, from the state caches
    assert sum(r["timings"]["item_states_cached"] for r in warm) == sum(len(r["candidates"]) for r in requests)

    # Offline: the encode job would add the unseen atoms to (a copy of) the store...
    offline_store = str(tmp_path / "store")
    shutil.copytree(world.cfg.store.path, offline_store)
    new = sorted({t for k in ("liked", "disliked", "items") for t in u[k][:2]})
    encoder = build_encoder(world.cfg.encoder, "cpu")
    store = EmbeddingStore.read(offline_store)
    store.add(atom_ids(new), encoder.encode(new), new)
    store.commit()
    # ...and the same samples, one row per candidate, go through evaluate_checkpoint.
    offline = evaluate_requests(world.checkpoints[0], requests, offline_store, tmp_path)
    for answers in (served, warm):
        online = np.array([s["score"] for r in answers for s in r["scores"]])
        np.testing.assert_allclose(online, offline, atol=1e-5, rtol=0)


def evaluate_requests(checkpoint: str, requests: list[dict[str, Any]], store_path: str, tmp_path: Path) -> np.ndarray:
    """evaluate_checkpoint's scores of the sample rows of `requests` (one per candidate), on `store_path`."""
    rows: dict[str, list[Any]] = {name: [] for name in sample_schema(FIELDS).names}
    for i, body in enumerate(requests):
        hist = {f: atom_ids(body.get("behaviors", {}).get(f, [])).tolist() or body.get("behavior_ids", {}).get(f, [])
                for f in FIELDS}
        for c in body["candidates"]:
            rows["user_id"].append(str(i))
            rows["ts"].append(0)
            rows["item_id"].append(c["item_id"])
            rows["item_atom_id"].append(c.get("atom_id") or int(atom_ids([c["text"]])[0]))
            rows["label"].append(0)
            rows["split"].append("test")
            for f in FIELDS:
                rows[hist_column(f)].append(hist[f])
    samples = tmp_path / f"samples-{time.monotonic_ns()}"
    folder = samples / "table" / "split=test"
    folder.mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=sample_schema(FIELDS)).drop(["split"]), folder / "part-0.parquet")
    evaluation = evaluate_checkpoint(checkpoint, "test", samples_path=str(samples), store_path=store_path)
    return evaluation.scores.column("score").to_numpy()


def test_online_vectors_equal_stored_vectors(url: str, world: World) -> None:
    """The AtomEncoder deployment reproduces the store's vectors (same fingerprint, fp32 CPU)."""
    from ray import serve

    texts = world.stored["liked"][:20]
    handle = serve.get_deployment_handle("AtomEncoder", APP_NAME)
    online = handle.encode.remote(atom_ids(texts).tolist(), texts).result()
    stored = EmbeddingStore.read(world.cfg.store.path).lookup(atom_ids(texts))
    np.testing.assert_allclose(online, stored, atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def foreign_checkpoint(world: World, tmp_path_factory: pytest.TempPathFactory) -> str:
    """ckpt-a recorded as trained on another encoder (max_tokens 32): it does not fit the store."""
    meta = json.loads(Path(world.checkpoints[0], "checkpoint.json").read_text())
    meta["config"]["encoder"]["max_tokens"] = 32
    meta["encoder_fingerprint_id"] = "f" * 16
    folder = tmp_path_factory.mktemp("foreign") / "ckpt"
    shutil.copytree(world.checkpoints[0], folder)
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    return str(folder)


def test_encoder_and_scorer_refuse_another_fingerprint(world: World, foreign_checkpoint: str) -> None:
    other = world.cfg.model_copy(deep=True)
    other.serve.checkpoint = foreign_checkpoint
    with pytest.raises(FingerprintMismatchError, match="max_tokens"):
        AtomEncoder.func_or_class(other)
    with pytest.raises(FingerprintMismatchError, match="checkpoint"):
        load_scorer_state(foreign_checkpoint, world.cfg, world.fingerprint)
    with pytest.raises(FingerprintMismatchError, match="online encoder"):
        load_scorer_state(world.checkpoints[0], world.cfg, "0" * 16)


# ---- bad input ------------------------------------------------------------------------------


def _bad_cases(world: World) -> list[tuple[str, Any, int, str]]:
    """(name, body (dict -> JSON, bytes -> as is), expected status, expected field)."""
    good = good_request(world, 2)
    cand = good["candidates"][0]
    liked = good["behaviors"]["liked"]

    def with_(**changes: Any) -> dict[str, Any]:
        return {**good, **changes}

    def ids(*values: Any) -> dict[str, Any]:
        return with_(behaviors={}, behavior_ids={"disliked": list(values)})

    return [
        ("malformed JSON", b'{"candidates": [', 400, "body"),
        ("not an object", b"[1, 2]", 422, "body"),
        ("empty body", b"", 422, "body"),
        ("missing candidates", {"behaviors": good["behaviors"]}, 422, "candidates"),
        ("empty candidates", with_(candidates=[]), 422, "candidates"),
        ("null candidates", with_(candidates=None), 422, "candidates"),
        ("candidates not a list", with_(candidates="abc"), 422, "candidates"),
        ("too many candidates", with_(candidates=[cand] * 51), 422, "candidates"),
        ("candidate without item_id", with_(candidates=[{"text": cand["text"]}]), 422, "candidates[0].item_id"),
        ("numeric item_id", with_(candidates=[cand, {**cand, "item_id": 7}]), 422, "candidates[1].item_id"),
        ("candidate text and atom_id", with_(candidates=[{**cand, "atom_id": 1}]), 422, "candidates[0]"),
        ("candidate with neither", with_(candidates=[{"item_id": "x"}]), 422, "candidates[0]"),
        ("blank candidate text", with_(candidates=[cand, cand, {**cand, "text": " \t "}]), 422, "candidates[2].text"),
        ("over-long candidate text", with_(candidates=[{**cand, "text": "x" * 301}]), 422, "candidates[0].text"),
        ("unknown candidate key", with_(candidates=[{**cand, "price": 3}]), 422, "candidates[0].price"),
        ("unknown top-level key", with_(user="u1"), 422, "user"),
        ("behaviors not an object", with_(behaviors=liked), 422, "behaviors"),
        ("field not a list", with_(behaviors={"liked": "Toy Story"}), 422, "behaviors.liked"),
        ("number among texts", with_(behaviors={"liked": [liked[0], 5]}), 422, "behaviors.liked[1]"),
        ("too many behaviours", with_(behaviors={"liked": liked * 5}), 422, "behaviors.liked"),
        ("over-long behaviour", with_(behaviors={"disliked": ["y" * 301]}), 422, "behaviors.disliked[0]"),
        ("unknown behaviour field", with_(behaviors={**good["behaviors"], "watched": liked}), 422, "behaviors.watched"),
        ("NaN atom id", b'{"behavior_ids": {"liked": [NaN]}, "candidates": [{"item_id": "1", "text": "x"}]}',
         422, "behavior_ids.liked[0]"),
        ("Infinity atom id", b'{"candidates": [{"item_id": "1", "atom_id": Infinity}]}', 422, "candidates[0].atom_id"),
        ("float atom id", ids(1.5), 422, "behavior_ids.disliked[0]"),
        ("string atom id", ids(5, "12"), 422, "behavior_ids.disliked[1]"),
        ("atom id beyond int64", ids(2**64), 422, "behavior_ids.disliked[0]"),
        ("atom id not in store", ids(12345), 422, "behavior_ids.disliked[0]"),
        ("item atom id not in store", with_(candidates=[cand, {"item_id": "z", "atom_id": 99}]), 422,
         "candidates[1].atom_id"),
        ("field as texts and ids", with_(behavior_ids={"liked": [1]}), 422, "behavior_ids.liked"),
        ("numeric request_id", with_(request_id=12), 422, "request_id"),
        ("body over max_request_bytes", with_(request_id="r" * 30_000), 413, "body"),
    ]


def test_bad_requests_get_4xx_naming_the_field(client: httpx.Client, world: World) -> None:
    cases = _bad_cases(world)
    assert len(cases) >= 20
    good = good_request(world, 3)
    expected_scores = score(client, good)["scores"]
    for name, body, status, field in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = client.post("/v1/score", content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()
        assert error["field"] == field, (name, error)
        assert field in error["error"], (name, error)
        assert score(client, good)["scores"] == expected_scores, name  # the service keeps answering
    wrong_type = client.post("/v1/score", content=b"candidates=1", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "body"


def test_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    """No Content-Length (chunked upload): the body is counted as it arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"candidates": ['
        for _ in range(100):
            yield b'{"item_id": "1", "text": "' + b"x" * 250 + b'"},'

    response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_serve_benchmark_reports_latency_and_stops(url: str, world: World, tmp_path: Path) -> None:
    report = run_serve_benchmark(world.cfg, url, clients=2, requests=6, candidates=5, behaviors=12)
    assert report["requests"] == report["ok"] == 6 and report["statuses"] == {"200": 6}
    assert 0 < report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"] and report["requests_per_s"] > 0
    assert report["scores_per_s"] == pytest.approx(5 * report["requests_per_s"], rel=0.01)
    parts = report["breakdown_ms"]
    assert set(parts) == {"http_ms", "ingress_to_scorer_ms", "prepare_ms", "encode_ms", "queue_ms", "model_ms",
                          "batch_requests"}
    assert 0 < parts["model_ms"] < report["p99_ms"] and parts["http_ms"] > 0 and parts["encode_ms"] < 1
    with pytest.raises(ValueError, match="loopback"):
        run_serve_benchmark(world.cfg, "http://10.0.0.1:8000")

    # `bahe bench serve --url`: one run per client count, written as JSON.
    bench.main(world.cfg, ["serve", "--url", url, "--clients", "1", "2", "--requests", "2", "--candidates", "3",
                           "--behaviors", "4", "--out", str(tmp_path), "--name", "serve"])
    runs = json.loads((tmp_path / "serve.json").read_text())["runs"]
    assert [(r["mode"], r["clients"], r["ok"]) for r in runs] == [("as-deployed", 1, 2), ("as-deployed", 2, 4)]
    assert (tmp_path / "serve.png").stat().st_size > 0


# ---- overload, failures, rollout ------------------------------------------------------------


def test_overload_is_shed_with_503_and_retry_after(url: str, world: World) -> None:
    body = good_request(world, 4, candidates=40)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=200)) as c:
            return await asyncio.gather(*(c.post("/v1/score", json=body) for _ in range(120)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= SCORER_OPTIONS["max_ongoing_requests"], codes
    shed = [r for r in responses if r.status_code == 503]
    assert shed, "a burst above capacity was not shed"
    assert all(r.headers.get("retry-after") == "1" for r in shed)


class Traffic:
    """Clients posting good requests in background threads until stopped; records every outcome."""

    def __init__(self, url: str, world: World, clients: int = 3, body: dict[str, Any] | None = None) -> None:
        self.stop = threading.Event()
        self.outcomes: list[tuple[float, int, str | None]] = []  # (time, status, model_version)
        self.answers: list[tuple[float, dict[str, Any]]] = []  # (time, body) of the 200s
        self.threads = [threading.Thread(target=self._run, args=(url, world, i, body)) for i in range(clients)]

    def _run(self, url: str, world: World, seed: int, body: dict[str, Any] | None) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/v1/score", json=body or good_request(world, seed))
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.outcomes.append((time.monotonic(), r.status_code, version))
                    if r.status_code == 200:
                        self.answers.append((time.monotonic(), r.json()))
                except httpx.HTTPError:
                    self.outcomes.append((time.monotonic(), 0, None))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_killed_scorer_replica_recovers(url: str, world: World, client: httpx.Client) -> None:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Scorer#" in a["name"]]
    with Traffic(url, world) as traffic:
        wait_for(lambda: len(traffic.outcomes) >= 5)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        wait_for(lambda: sum(1 for t, s, _ in traffic.outcomes if t > killed_at and s == 200) >= 10)
    codes = [s for _, s, _ in traffic.outcomes]
    failed = [s for s in codes if s != 200]
    assert set(failed) <= {503}, codes  # failures are clean: Retry-After-able 503s, never a 500
    assert len(failed) <= 3, codes  # at most the requests in flight at the kill (3 clients)
    assert score(client, good_request(world))["model_version"] == world.versions[0]


def test_store_update_mid_traffic_empties_the_state_caches(url: str, world: World, client: httpx.Client) -> None:
    """Requests with an item the store lacks flow (encoded online, states cached) while the encode job commits
    that item: the scorer moves to the new store version, empties its caches and scores the same rows alike."""
    body = good_request(world, 5)
    late = world.unseen["items"][-1]
    body["candidates"].append({"item_id": "late", "text": late})
    before = score(client, body)
    version = before["store_version"]
    assert before["atoms_encoded"] == 1
    invalidations = client.get("/v1/stats").json()["invalidations"]
    with Traffic(url, world, body=body) as traffic:
        wait_for(lambda: len(traffic.answers) >= 5)
        store = EmbeddingStore.read(world.cfg.store.path)
        store.add(atom_ids([late]), build_encoder(world.cfg.encoder, "cpu").encode([late]), [late])
        store.commit()
        wait_for(lambda: sum(a["store_version"] == version + 1 for _, a in traffic.answers) >= 5)
    assert {s for _, s, _ in traffic.outcomes} == {200}
    versions = [a["store_version"] for _, a in traffic.answers]
    assert versions == sorted(versions)  # never back to the old version
    newer = [a for _, a in traffic.answers if a["store_version"] == version + 1]
    # the item now comes from the store (a request prepared on the old version may answer on the new one)
    assert all(a["atoms_encoded"] == 0 for a in newer[len(traffic.threads) :])
    for answer in newer:
        np.testing.assert_allclose([s["score"] for s in answer["scores"]], [s["score"] for s in before["scores"]],
                                   atol=1e-5, rtol=0)
    stats = client.get("/v1/stats").json()
    assert stats["store_version"] == version + 1 and stats["invalidations"] == invalidations + 1


def test_failed_rollout_keeps_the_current_model(
    url: str, world: World, foreign_checkpoint: str, tmp_path: Path
) -> None:
    """A user_config checkpoint that does not fit the store: serving replicas keep their model and say why."""

    def rollout_error() -> str | None:
        return httpx.get(f"{url}/v1/model", timeout=30).json()["rollout_error"]

    with Traffic(url, world) as traffic:
        wait_for(lambda: len(traffic.outcomes) >= 5)
        serve_run(world, tmp_path, {"user_config": {"checkpoint": foreign_checkpoint}})
        wait_for(lambda: rollout_error() is not None)
        seen = len(traffic.outcomes)
        wait_for(lambda: len(traffic.outcomes) >= seen + 5)
    assert {s for _, s, _ in traffic.outcomes} == {200}
    assert {v for _, _, v in traffic.outcomes} == {world.versions[0]}
    assert "FingerprintMismatchError" in (rollout_error() or "")


def test_user_config_rollout_switches_model_without_failures(url: str, world: World, tmp_path: Path) -> None:
    """A serve config naming another checkpoint in the Scorer's user_config: reloaded in place, no request fails."""
    with Traffic(url, world) as traffic:
        wait_for(lambda: len(traffic.outcomes) >= 5)
        serve_run(world, tmp_path, {"user_config": {"checkpoint": world.checkpoints[1]}})
        switched = time.monotonic()
        wait_for(lambda: sum(1 for t, _, v in traffic.outcomes if t > switched and v == world.versions[1]) >= 5)
    codes = [s for _, s, _ in traffic.outcomes]
    assert set(codes) == {200}, codes
    versions = [v for _, _, v in traffic.outcomes]
    first_new = versions.index(world.versions[1])
    assert set(versions[:first_new]) == {world.versions[0]}
    assert set(versions[first_new + len(traffic.threads):]) == {world.versions[1]}  # no flapping back
    info = httpx.get(f"{url}/v1/model").json()
    assert info["version"] == world.versions[1] and info["rollout_error"] is None
    # The new checkpoint's scores, not states cached under the old one: equal to its offline evaluation.
    body = good_request(world, 0)
    answer = score(httpx.Client(base_url=url, timeout=60), body)
    assert answer["model_version"] == world.versions[1]
    offline = evaluate_requests(world.checkpoints[1], [body], world.cfg.store.path, tmp_path)
    np.testing.assert_allclose([s["score"] for s in answer["scores"]], offline, atol=1e-5, rtol=0)
