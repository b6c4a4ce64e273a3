"""`bench encode`: the shallow encoder's atoms/s and achieved TFLOP/s against a bf16 matmul peak
measured in the same run; through `TransformersEncoder.encode` on texts; on real atoms (MovieLens-100K,
synthetic events) unique atoms/s and events/s with either backend.

Random-weight checkpoints (`random_checkpoint`) load like real ones: speed does not depend on the
weights. Ray, pyarrow and the data adapters are imported where used.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import PretrainedConfig

from bahe_ray.bench.harness import (
    Result,
    attention_width,
    forward_flops,
    free_memory,
    layer_parameters,
    matmul_peak_tflops,
    time_calls,
)
from bahe_ray.config import Config, EncoderConfig
from bahe_ray.models.backbone import Backbone, pool_hidden, positions_from_mask
from bahe_ray.models.registry import load_backbone, model_config, model_label, weights_kind
from bahe_ray.runtime import default_dtype, environment, resolve_device, setup_device

Backend = Literal["transformers", "vllm"]


@torch.inference_mode()
def encode_ids(backbone: Backbone, k: int, input_ids: Tensor, mask: Tensor, device: str) -> Tensor:
    """TransformersEncoder's work on one padded micro-batch: embed, layers [0, k), final norm, mean, to host."""
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = positions_from_mask(mask)
    hidden = backbone.embed(input_ids, positions)
    hidden = backbone.run_layers(hidden, mask, 0, k, positions)
    return pool_hidden(backbone.final_norm(hidden), mask, "mean").cpu()


def bench_encode_model(
    model: str | PretrainedConfig, *, k: int, tokens: int, batch_atoms: list[int], device: str = "auto",
    warmup: int = 3, steps: int = 10, compile: bool = False,
) -> Result:
    """Shallow-encoder atoms/s and TFLOP/s on random token ids of exactly `tokens` tokens, per micro-batch size."""
    device = resolve_device(device)
    setup_device(device)
    env = environment(device)
    backbone = load_backbone(model, default_dtype(device), device)
    backbone.keep_layers(0, k)
    backbone.eval()
    if compile:
        backbone.compile_layers()
    params, width = layer_parameters(backbone), attention_width(backbone.config)
    peak = matmul_peak_tflops(device)
    rows: list[Result] = []
    for atoms in batch_atoms:
        ids = torch.randint(0, backbone.config.vocab_size, (atoms, tokens))
        mask = torch.ones(atoms, tokens, dtype=torch.bool)
        try:
            times = time_calls(lambda i: encode_ids(backbone, k, ids, mask, device), device, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            times = []
        if not times:
            free_memory(device)
            rows.append({"atoms_per_batch": atoms, "oom": True})
            continue
        ms = statistics.median(times)
        tflops = forward_flops(params, k, width, tokens, atoms) / ms * 1e3 / 1e12
        rows.append({
            "atoms_per_batch": atoms, "oom": False, "batch_tokens": atoms * tokens, "ms": round(ms, 3),
            "atoms_per_s": round(atoms / ms * 1e3, 1), "tflops": round(tflops, 2), "of_peak": round(tflops / peak, 3),
        })
    done = [r for r in rows if not r["oom"]]
    return {
        "bench": "encode-model", "env": env, "model": model_label(model), "weights": weights_kind(model),
        "k": k, "tokens": tokens, "dtype": str(default_dtype(device)).removeprefix("torch."), "compile": compile,
        "matmul_peak_tflops": round(peak, 3), "layer_params": params,
        "flops_per_atom": forward_flops(params, k, width, tokens, 1),
        "rows": rows, "best": max(done, key=lambda r: r["atoms_per_s"]) if done else None,
    }


def random_checkpoint(model: str | PretrainedConfig, layers: int | None, out_dir: str | Path) -> Path:
    """A random-weight decoder checkpoint of a model's first `layers` layers (None: all), with a byte-level
    tokenizer without merges (one token per ASCII character), so it loads like a real one."""
    from tokenizers import pre_tokenizers
    from transformers import AutoModel, Qwen2Tokenizer

    config = model_config(model)
    if config.model_type != "qwen2":
        raise ValueError(f"random_checkpoint builds Qwen2 shapes, not {config.model_type!r}")
    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": layers or config.num_hidden_layers,
                                 "layer_types": None})
    AutoModel.from_config(config, dtype=torch.bfloat16).save_pretrained(out_dir)
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(out_dir)
    return Path(out_dir)


def random_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    """n texts of `chars` random lowercase letters."""
    letters = np.random.default_rng(seed).integers(ord("a"), ord("z") + 1, size=(n, chars), dtype=np.uint8)
    return [row.tobytes().decode() for row in letters]


def bench_encode_texts(encoder: Any, texts: list[str], batch_size: int) -> Result:
    """`encoder.encode` over `texts` in calls of `batch_size` atoms, as the encode job's actors call it;
    tokenisation alone is timed too (it runs on the host inside encode)."""
    encoder.encode(texts[:batch_size])  # warm-up: the calls' shapes (a compiled encoder compiles them here)
    if len(texts) % batch_size:
        encoder.encode(texts[-(len(texts) % batch_size):])
    start = time.perf_counter()
    n_tokens = sum(len(ids) for ids in encoder.atoms.ids(texts))
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        encoder.encode(texts[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {
        "atoms": len(texts), "tokens": n_tokens, "batch_size": batch_size,
        "max_batch_tokens": encoder.max_batch_tokens, "seconds": round(seconds, 3),
        "atoms_per_s": round(len(texts) / seconds, 1), "tokenize_atoms_per_s": round(len(texts) / tokenize_s, 1),
        "compile": encoder.cfg.compile,
    }


def source_atoms(cfg: Config, source: str, events: int, workdir: str | Path) -> tuple[list[str], int, int, float]:
    """(unique atom texts, behaviour events, impressions, dedup seconds) of MovieLens or synthetic logs.

    Dedup is what the encode job does per atom: normalise, hash to an id, keep one text per id.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bahe_ray.atoms import atom_ids, normalize_column

    if source == "movielens":
        from bahe_ray.data import movielens

        ev, imp = movielens.to_tables(movielens.load_ratings(cfg.data.movielens_path, Path(cfg.data.cache_dir)))
    else:
        from bahe_ray.data import synthetic

        synth = cfg.data.synthetic.model_copy(update={"n_events": events})
        ev_dir, imp_dir = synthetic.generate(synth, str(Path(workdir) / "synthetic"))
        ev, imp = pq.read_table(ev_dir), pq.read_table(imp_dir)
    start = time.perf_counter()
    texts = normalize_column(pa.chunked_array([*ev.column("text").chunks, *imp.column("item_text").chunks]))
    _, first = np.unique(atom_ids(texts.to_pylist()), return_index=True)
    unique = texts.take(pa.array(first)).to_pylist()
    return unique, ev.num_rows, imp.num_rows, time.perf_counter() - start


def encode_throughput(cfg: EncoderConfig, texts: list[str], backend: Backend, device: str) -> Result:
    """Atoms/s of `backend` encoding `texts` in calls of `cfg.batch_size`, as the encode job's actors call it.

    Start-up (model load, engine start) is timed apart; one warm-up call is not timed. Run one
    backend per process: the vLLM engine runs in this process and, on CPU, pins its torch threads,
    which would slow a transformers measurement made after it.
    """
    from bahe_ray.encoders import build_encoder

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


def bench_encode_source(cfg: Config, source: str, events: int, workdir: str | Path, device: str, backend: Backend) -> Result:
    """Unique atoms/s and events/s of dedup + encoding (cfg.encoder on `backend`) of a source's atoms."""
    texts, n_events, n_impressions, dedup_s = source_atoms(cfg, source, events, workdir)
    encoded = encode_throughput(cfg.encoder, texts, backend, resolve_device(device))
    total = dedup_s + encoded["seconds"]
    return {
        "source": source, "events": n_events, "impressions": n_impressions, "unique_atoms": len(texts),
        "dedup_s": round(dedup_s, 3), "encode": encoded,
        "unique_atoms_per_s": encoded["atoms_per_s"],
        "events_per_s": round(n_events / total, 1),
        "occurrences_per_s": round((n_events + n_impressions) / total, 1),
    }


def bench_encode(
    cfg: Config, *, backend: Backend, model: str | None, k: int, tokens: int, batch_atoms: list[int], texts: int,
    max_batch_tokens: list[int], data: list[str], events: int, warmup: int, steps: int, compile: bool, device: str,
) -> Result:
    """The model-level run (`model`), `texts` random texts through TransformersEncoder.encode at each
    of `max_batch_tokens`, and the unique atoms of each of `data`'s sources with cfg.encoder."""
    if backend == "vllm" and (model or texts):
        raise ValueError("bench encode --backend vllm measures --data sources only (--model and --texts are transformers)")
    device = resolve_device(device)
    result: Result = {"bench": "encode", "env": environment(device), "backend": backend}
    if model:
        result["model_level"] = bench_encode_model(
            model, k=k, tokens=tokens, batch_atoms=batch_atoms, device=device, warmup=warmup, steps=steps,
            compile=compile,
        )
    with tempfile.TemporaryDirectory() as tmp:
        if texts:
            from bahe_ray.encoders.hf import TransformersEncoder

            path = random_checkpoint(model or "qwen2.5-0.5b", k, Path(tmp) / "ckpt")
            enc_cfg = EncoderConfig(model=str(path), k=k, max_tokens=tokens, compile=compile or cfg.encoder.compile)
            sample = random_texts(texts, tokens)
            result["texts"] = []
            for max_tokens in max_batch_tokens:
                encoder = TransformersEncoder(enc_cfg, device=device, max_batch_tokens=max_tokens)
                for batch_size in sorted({cfg.encoder.batch_size, max(1, max_tokens // tokens)}):
                    result["texts"].append(bench_encode_texts(encoder, sample, batch_size))
                del encoder
                free_memory(device)
        result["sources"] = [bench_encode_source(cfg, source, events, tmp, device, backend) for source in data]
        result["encoder"] = cfg.encoder.model_dump(mode="json") if data else None
    return result
