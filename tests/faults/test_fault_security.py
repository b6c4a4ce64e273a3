"""Security basics: no pickle on any load path, loopback-only local defaults, request size limits,
and `trust_remote_code` off unless a profile turns it on.

The 413 of the running app (declared and streamed bodies over its limit) is tested in
tests/test_serve.py; here the default limit of ServeConfig is checked on the same ASGI app.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

import bahe_ray
from bahe_ray.checkpoint import MODEL_FILE, CheckpointCorruptError, CheckpointMeta, load_checkpoint, save_checkpoint
from bahe_ray.config import Config, EncoderConfig, ServeConfig, load_config
from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.store import EmbeddingStore, StoreCorruptError

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(Path(bahe_ray.__file__).parent.rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


class Payload:
    """Unpickling this creates `marker`: proof that a file went through pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(dotted name of the callee, call) for every call, e.g. ("torch.load", ...); "<expr>.eval" for x().eval()."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            parts.append(func.id if isinstance(func, ast.Name) else "<expr>")
            out.append((".".join(reversed(parts)), node))
    return out


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unsafe_deserialisation_in_the_library() -> None:
    assert len(SOURCES) > 20
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                problems += [f"{where}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in PICKLE_MODULES]
        for name, call in calls(tree):
            line = f"{where}:{call.lineno} {name}"
            if name.endswith("torch.load") and not is_true(keyword(call, "weights_only")):
                problems.append(f"{line} without weights_only=True")
            if name in ("np.load", "numpy.load") and is_true(keyword(call, "allow_pickle")):
                problems.append(f"{line} with allow_pickle=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{line}: use yaml.safe_load")
            if name in ("eval", "exec"):
                problems.append(line)
            if is_true(keyword(call, "trust_remote_code")):
                problems.append(f"{line} with trust_remote_code=True")
            if ".AutoModel" in f".{name}" and name.endswith(".from_pretrained"):
                if not is_true(keyword(call, "use_safetensors")):
                    problems.append(f"{line} without use_safetensors=True")
    assert not problems, problems


def small_checkpoint(folder: Path) -> None:
    from bahe_ray.checkpoint import build_model

    cfg = load_config(None, ["model.id_buckets=16", "model.id_embedding_dim=4", "model.head_hidden=[4]"])
    meta = CheckpointMeta(model_kind="id", config=cfg.model_dump(mode="json"), fields=["a"], max_behaviors=2, dim=4)
    save_checkpoint(str(folder), build_model("id", cfg), meta)


def test_a_pickle_in_place_of_checkpoint_weights_is_never_unpickled(tmp_path: Path) -> None:
    """Even with a matching sha256 in checkpoint.json, a pickle is refused as unreadable safetensors."""
    folder = tmp_path / "ckpt"
    small_checkpoint(folder)
    marker = tmp_path / "unpickled"
    data = pickle.dumps({"head.weight": Payload(marker)})
    (folder / MODEL_FILE).write_bytes(data)
    record = json.loads((folder / "checkpoint.json").read_text())
    record["model_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointCorruptError, match="unreadable safetensors"):
        load_checkpoint(str(folder))
    assert not marker.exists()


def test_a_pickle_in_place_of_a_store_part_is_never_unpickled(tmp_path: Path) -> None:
    """Even recorded with its size and sha256 in the manifest, a pickled part is refused as unreadable parquet."""
    fp = EncoderFingerprint(model_name="m", weights_sha256="ef" * 32, k=1, pooling="mean", dtype="float32", max_tokens=8)
    store = EmbeddingStore.open(str(tmp_path / "store"), fp, 4)
    part = store.add(np.arange(3), np.ones((3, 4)))
    store.commit()
    marker = tmp_path / "unpickled"
    data = pickle.dumps(Payload(marker))
    (tmp_path / "store" / "parts" / part.name).write_bytes(data)
    manifest = tmp_path / "store" / "manifests" / "v00000001.json"
    record = json.loads(manifest.read_text())
    record["parts"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.write_text(json.dumps(record))
    with pytest.raises(StoreCorruptError, match=part.name):
        EmbeddingStore.read(str(tmp_path / "store")).lookup(np.arange(3))
    assert not EmbeddingStore.read(str(tmp_path / "store")).verify().ok
    assert not marker.exists()


def test_an_encoder_checkpoint_with_only_pickled_weights_is_refused(tmp_path: Path, minilm_path: Path) -> None:
    from bahe_ray.encoders.hf import TransformersEncoder

    folder = tmp_path / "model"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.h5", "*.onnx"))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        TransformersEncoder(EncoderConfig(model=str(folder)), device="cpu")
    assert not marker.exists()


def test_local_defaults_listen_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray import serve

    from bahe_ray import cli
    from bahe_ray import serve as bahe_serve

    assert ServeConfig().host == "127.0.0.1"
    assert load_config(REPO / "configs" / "local.yaml").serve.host == "127.0.0.1"
    assert yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())["http_options"]["host"] == "127.0.0.1"

    seen: dict[str, Any] = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(init=kwargs))
    cli.init_ray(Config())
    init = seen["init"]
    assert init["address"] == "local"
    assert init.get("include_dashboard") is False or init.get("dashboard_host") == "127.0.0.1", init

    monkeypatch.setattr(serve, "start", lambda **kwargs: seen.update(start=kwargs))
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: None)
    bahe_serve.serve_blocking(Config())
    assert seen["start"]["http_options"]["host"] == "127.0.0.1"


def test_default_request_size_limit_is_enforced() -> None:
    """ServeConfig's default 2 MB body limit: 413 naming the body, declared or not, before any parsing."""
    from bahe_ray.serve import make_api

    limit = ServeConfig().max_request_bytes
    assert limit == 2_000_000
    client = TestClient(make_api(None, ServeConfig()))  # the limit answers before the scorer is needed
    over = b'{"candidates": [], "request_id": "' + b"r" * limit + b'"}'
    response = client.post("/v1/score", content=over, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["field"] == "body"

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"request_id": "'
        for _ in range(limit // 65_536 + 1):
            yield b"r" * 65_536

    response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_trust_remote_code_is_off_unless_configured(minilm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bahe_ray.encoders import hf
    from bahe_ray.models import backbone

    assert EncoderConfig().trust_remote_code is False
    assert load_config(REPO / "configs" / "local.yaml").encoder.trust_remote_code is False
    seen: list[tuple[str, bool]] = []

    def recording(name: str, load: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, kwargs.get("trust_remote_code", False)))
            return load(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(backbone.AutoModel, "from_pretrained", recording("model", backbone.AutoModel.from_pretrained))
    monkeypatch.setattr(hf.AutoTokenizer, "from_pretrained", recording("tokenizer", hf.AutoTokenizer.from_pretrained))
    for flag in (False, True):
        seen.clear()
        hf.TransformersEncoder(EncoderConfig(trust_remote_code=flag), device="cpu")
        assert seen == [("model", flag), ("tokenizer", flag)]
