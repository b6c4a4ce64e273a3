"""Shallow-encoder throughput of either backend on real atom texts: the hook for `bahe bench encode --backend`.

    python -m bahe_ray.encoders.throughput --backend vllm --atoms 4000 [--set encoder.k=2 ...]

Run one backend per process: the vLLM engine runs in the caller's process and, on CPU, pins its
torch threads, which would slow a transformers measurement made after it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Literal

from bahe_ray.config import EncoderConfig, load_config
from bahe_ray.data import movielens
from bahe_ray.encoders import build_encoder
from bahe_ray.runtime import default_device

Backend = Literal["transformers", "vllm"]


def encode_throughput(cfg: EncoderConfig, texts: list[str], backend: Backend, device: str | None = None) -> dict[str, Any]:
    """Atoms/s of `backend` encoding `texts` in calls of `cfg.batch_size`, as the encode job's actors call it.

    Start-up (model load, engine start) is timed apart; one warm-up call is not timed.
    """
    device = device or default_device()
    started = time.perf_counter()
    encoder = build_encoder(cfg.model_copy(update={"backend": backend}), device=device)
    load_s = time.perf_counter() - started
    encoder.encode(texts[: cfg.batch_size])
    started = time.perf_counter()
    for i in range(0, len(texts), cfg.batch_size):
        encoder.encode(texts[i : i + cfg.batch_size])
    seconds = time.perf_counter() - started
    return {
        "backend": backend, "device": device, "model": cfg.model, "k": cfg.k, "pooling": cfg.pooling,
        "dtype": encoder.fingerprint.dtype, "max_tokens": cfg.max_tokens, "batch_size": cfg.batch_size,
        "atoms": len(texts), "seconds": round(seconds, 3), "atoms_per_s": round(len(texts) / seconds, 1),
        "load_s": round(load_s, 2), "fingerprint_id": encoder.fingerprint.id,
    }


def movielens_atoms(movielens_path: str | None, cache_dir: Path, n: int) -> list[str]:
    """The first `n` distinct atom texts (rating events, then item titles) of MovieLens, sorted."""
    events, impressions = movielens.to_tables(movielens.load_ratings(movielens_path, cache_dir))
    texts = sorted(set(events.column("text").to_pylist()) | set(impressions.column("item_text").to_pylist()))
    return texts[:n]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["transformers", "vllm"], required=True)
    parser.add_argument("--atoms", type=int, default=4000, help="distinct MovieLens atom texts to encode")
    parser.add_argument("--config", help="YAML profile (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    texts = movielens_atoms(cfg.data.movielens_path, Path(cfg.data.cache_dir), args.atoms)
    print(json.dumps(encode_throughput(cfg.encoder, texts, args.backend)))


if __name__ == "__main__":
    main()
