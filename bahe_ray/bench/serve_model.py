"""A serving set-up written on the spot for `bench serve --model`: a BAHE checkpoint (new head) of a model
split at k and a store of random texts encoded by its first k layers.

The model is the packaged all-MiniLM-L6-v2, a folder with weights, or a Qwen2 shape (a preset such as
qwen2.5-0.5b, or a folder holding only config.json) given random weights here: weights cannot travel
to the benchmark machine, and speed does not depend on their values. The store is encoded by the
encoder the scorer's AtomEncoder builds (transformers backend, this device), so checkpoint, store and
online encoder share one fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from bahe_ray.atoms import atom_ids
from bahe_ray.bench.encode import random_checkpoint, random_texts
from bahe_ray.checkpoint import CheckpointMeta, build_model, save_checkpoint
from bahe_ray.config import MINILM, Config
from bahe_ray.encoders import build_encoder
from bahe_ray.store import EmbeddingStore

_CHUNK = 8192  # texts per encoder call and store part


def serving_setup(cfg: Config, model: str, k: int, fields: int, max_behaviors: int, atoms: int,
                  workdir: str | Path, device: str) -> Config:
    """`cfg` serving a new BAHE checkpoint of `model` split at `k` (fields named f0, f1, ..., `max_behaviors`
    each) from a new store of `atoms` random 32-letter texts, all under `workdir`."""
    work = Path(workdir)
    run = cfg.model_copy(deep=True)
    has_weights = model == MINILM or any(Path(model).glob("*.safetensors"))
    run.encoder.model = model if has_weights else str(random_checkpoint(model, None, work / "model"))
    run.encoder.k, run.encoder.backend = k, "transformers"
    run.store.path = str(work / "store")
    run.samples.fields, run.samples.max_behaviors = [f"f{i}" for i in range(fields)], max_behaviors
    encoder = build_encoder(run.encoder, device)
    store = EmbeddingStore.open(run.store.path, encoder.fingerprint, encoder.dim)
    texts = random_texts(atoms, 32)
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        store.add(atom_ids(chunk), encoder.encode(chunk), chunk)
    store.commit()
    meta = CheckpointMeta(
        model_kind="bahe", config=run.model_dump(mode="json"), fields=run.samples.fields, max_behaviors=max_behaviors,
        dim=encoder.dim, encoder_fingerprint=encoder.fingerprint.model_dump(mode="json"),
        encoder_fingerprint_id=encoder.fingerprint.id, store_path=run.store.path,
    )
    run.serve.checkpoint = str(work / "checkpoint")
    save_checkpoint(run.serve.checkpoint, build_model("bahe", run), meta)
    return run
