"""The vLLM backend of the shallow encoder: the same vectors as `hf.TransformersEncoder`, from a vLLM engine.

vLLM cannot stop a model after k layers (`hf_overrides={"num_hidden_layers": k}` fails at
weight loading), so the encoder loads a truncated checkpoint (first k layers, tokenizer,
config) written once per fingerprint into `encoder.cache_dir` (a local folder or s3://). A
pooling runner over it returns mean or last-token pooling of `final_norm(h_k)` (decoders) or
of layer k (BERT): exactly what the transformers backend computes, provided the tokens are the
same. So texts are tokenised here with `split.AtomTokenizer` and passed as token prompts (vLLM's
own truncation may keep the other side), and pooling is unnormalised (`use_activation=False`).

In Ray Data each encoder actor holds one engine, run inside the actor's process (vLLM's
VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the environment says otherwise): the engine then dies
with its actor, which Ray restarts and whose batches it retries, whereas an engine subprocess
that dies mid-call leaves `LLM.embed` waiting forever (vLLM 0.32), and on a GPU (vLLM 0.25.1)
makes every process abort at exit; it also starts ~4x faster on CPU. `engine_environment` sets
this, and what a GPU node without flashinfer needs, before vLLM is imported. With tensor_parallel_size > 1 the actor holds that many GPUs (Ray gives one actor's GPUs
on one node) and vLLM's multiprocessing executor runs a worker per GPU as the actor's child
processes: vLLM's advice for one node, and no placement groups to leak or clean up (Ray Data
2.60 calls a `ray_remote_args_fn` once more than it starts actors, so a placement group per call
would reserve GPUs that no actor uses), and the workers die with their actor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from bahe_ray.config import EncoderConfig, StorageConfig
from bahe_ray.encoders import encoder_fingerprint
from bahe_ray.encoders.base import EncoderFingerprint
from bahe_ray.encoders.truncate import write_truncated_checkpoint
from bahe_ray.fs import filesystem, is_remote, join
from bahe_ray.models.registry import resolve_model_path
from bahe_ray.models.tokens import AtomTokenizer
from bahe_ray.runtime import default_device

COMPLETE = "_COMPLETE.json"  # written last into a remote cache folder: the files it lists are whole
KV_CACHE_SEQS = 1024  # sequences of max_model_len the KV cache holds at least (vLLM's largest default max_num_seqs)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def truncated_checkpoint(
    cfg: EncoderConfig,
    fingerprint: EncoderFingerprint,
    storage: StorageConfig | None = None,
    local_root: Path | None = None,
) -> Path:
    """A local folder holding the first `cfg.k` layers of `cfg.model`, made once per fingerprint.

    A local `cfg.cache_dir` holds it at `<cache_dir>/<fingerprint id>` (appears atomically, so
    racing actors are safe). For s3:// the folder is built locally, uploaded file by file, then
    marked complete by COMPLETE (racing writers upload identical bytes); users download a
    complete folder into `local_root` (default: the system temp folder) by rename.
    """
    source = resolve_model_path(cfg.model)
    if not is_remote(cfg.cache_dir):
        return write_truncated_checkpoint(source, cfg.k, Path(cfg.cache_dir) / fingerprint.id)
    local = (local_root or Path(tempfile.gettempdir()) / "bahe-encoders") / fingerprint.id
    if local.exists():
        return local
    fs, remote = filesystem(join(cfg.cache_dir, fingerprint.id), storage)
    marker = f"{remote}/{COMPLETE}"
    if not fs.exists(marker):
        write_truncated_checkpoint(source, cfg.k, local)
        names = sorted(p.name for p in local.iterdir())
        for name in names:
            fs.put_file(str(local / name), f"{remote}/{name}")
        fs.pipe_file(marker, json.dumps({"fingerprint": fingerprint.model_dump(), "files": names}).encode())
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}-", dir=local.parent))
    try:
        for name in json.loads(fs.cat_file(marker))["files"]:
            fs.get_file(f"{remote}/{name}", str(tmp / name))
        os.replace(tmp, local)
    except OSError:
        if not local.exists():  # else a concurrent reader won the rename with the same files
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def engine_environment(device: str) -> None:
    """Set what vLLM reads from the environment at import and engine start (a value already set wins).

    The engine runs in this process (see the module's docstring). vLLM's GPU model runner builds
    flashinfer's sampler even for pooling models unless VLLM_USE_FLASHINFER_SAMPLER=0, and fails
    where flashinfer is not installed; pooling samples nothing, so nothing is lost.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device == "cuda" and importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def engine_arguments(cfg: EncoderConfig, device: str) -> dict[str, Any]:
    """The scheduling and compilation arguments of the engine: cfg's vllm_* fields, else the defaults
    for `device` (eager on CPU, where torch.compile adds ~30 s to a start; CUDA graphs on a GPU)."""
    args: dict[str, Any] = {
        "enforce_eager": cfg.vllm_enforce_eager if cfg.vllm_enforce_eager is not None else device == "cpu",
    }
    if cfg.vllm_max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = cfg.vllm_max_num_batched_tokens
    if cfg.vllm_max_num_seqs is not None:
        args["max_num_seqs"] = cfg.vllm_max_num_seqs
    if cfg.vllm_chunked_prefill is not None:
        args["enable_chunked_prefill"] = cfg.vllm_chunked_prefill
    if cfg.vllm_prefix_caching is not None:
        args["enable_prefix_caching"] = cfg.vllm_prefix_caching
    return {**args, **cfg.vllm_engine_args}


def kv_cache_bytes(config: Any, dtype: str, max_model_len: int, seqs: int = KV_CACHE_SEQS) -> int:
    """KV cache for `seqs` (at least KV_CACHE_SEQS) full-length prompts of the truncated model.

    Set explicitly because vLLM's default reserves a fraction of the whole device (on CPU:
    90% of RAM), where a k-layer encoder of short atoms needs a few hundred MB at most.
    """
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * _DTYPE_BYTES[dtype]
    return max(per_token * max_model_len * max(seqs, KV_CACHE_SEQS), 64 << 20)


class VLLMEncoder:
    """ShallowEncoder on a vLLM pooling engine (vLLM's build decides the device: CUDA or CPU).

    The engine runs in this process, which on CPU pins the process's torch threads: build it
    in a process of its own (a Ray actor, a benchmark run).
    """

    def __init__(self, cfg: EncoderConfig, device: str | None = None, storage: StorageConfig | None = None) -> None:
        self.device = device or default_device()
        engine_environment(self.device)
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.platforms import current_platform

        engine_device = "cuda" if current_platform.is_cuda_alike() else current_platform.device_type
        if engine_device != self.device:
            raise RuntimeError(f"encoder device {self.device!r}, but the installed vLLM build runs on {engine_device!r}")
        self.fingerprint = encoder_fingerprint(cfg, self.device)
        path = truncated_checkpoint(cfg, self.fingerprint, storage)
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        self.cfg = cfg
        self.dim: int = config.hidden_size
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        self.atoms = AtomTokenizer(tokenizer, cfg.max_tokens)
        max_model_len = min(cfg.max_tokens + 2, config.max_position_embeddings)
        engine_args = engine_arguments(cfg, self.device)
        self.llm = LLM(
            model=str(path),
            runner="pooling",
            dtype=self.fingerprint.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes(
                config, self.fingerprint.dtype, max_model_len, engine_args.get("max_num_seqs", KV_CACHE_SEQS)
            ),
            pooler_config=PoolerConfig(pooling_type=cfg.pooling.upper(), use_activation=False),
            trust_remote_code=cfg.trust_remote_code,
            disable_log_stats=True,
            **engine_args,
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        """Pooled layer-k vectors, (n, dim) float32, in input order; all texts go to the engine in one call.

        `LLM.encode` with the embed task, not `LLM.embed`: the same pooled tensors, without turning each
        vector into a Python list of floats (`EmbeddingOutput`) that is then copied back into an array.
        """
        import torch
        from vllm.inputs import TokensPrompt

        ids = self.atoms.ids(list(texts)) if texts else []
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise ValueError(f"texts at {empty[:5]} have no tokens")
        if not ids:
            return np.empty((0, self.dim), dtype=np.float32)
        prompts = [TokensPrompt(prompt_token_ids=seq) for seq in ids]
        outputs = self.llm.encode(prompts, pooling_task="embed", use_tqdm=False)
        return torch.stack([output.outputs.data for output in outputs]).float().cpu().numpy()

