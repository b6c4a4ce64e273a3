"""One optimisation step and what it needs: the seeded or warm-started model in its weights dtype,
AdamW with a backbone and a head learning rate, the training device and the autocast precision (bf16 on
GPU under "auto"), and `TrainStep`, the step itself: eager, compiled or captured as one CUDA graph,
as `train.*` says. Training (`run_epochs`, so `bahe train`, `compare`, the daily update) and every
benchmark run this one step."""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bahe_ray.checkpoint import build_model, load_weights, read_meta, unwrap
from bahe_ray.config import Config, TrainConfig
from bahe_ray.features import ModelBatch, ModelKind
from bahe_ray.models.ctr import IdCTR
from bahe_ray.train.device_table import DeviceTable

log = logging.getLogger(__name__)

GRAPH_WARMUP = 3  # eager steps of a new shape before its capture (optimizer state, compiled variants, cuBLAS)
LABELS = "labels"  # the graph's input buffer of the labels, next to the batch's tensors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def computes_on_gpu(cfg: Config) -> bool:
    """Training asks for GPUs and computes on them (not with `ray.gpu_compute: cpu`, the rehearsal cluster's
    logical GPUs: the workers still ask Ray for a GPU each)."""
    return cfg.train.use_gpu and cfg.ray.gpu_compute == "cuda"


def train_device(cfg: Config) -> str:
    if computes_on_gpu(cfg) and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is set but no CUDA device is visible (ray.gpu_compute: cpu computes on CPU)")
    return "cuda" if computes_on_gpu(cfg) else "cpu"


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """bf16 when asked, or on GPU under "auto"; None means no autocast."""
    if precision == "bfloat16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: str | torch.device, dtype: torch.dtype | None, cache: bool = True) -> AbstractContextManager:
    """torch.autocast to `dtype` on `device`'s type; no autocast when `dtype` is None. `cache=False` inside
    a CUDA graph capture (PyTorch's rule: the cast-weight cache would hold tensors of the capture)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def cast_weights(model: nn.Module, weights_dtype: str) -> nn.Module:
    """The transformer layers in `weights_dtype` (train.weights_dtype); head, field embedding and BERT's
    position rows stay fp32, and the id baseline has no layers. Returns `model`."""
    backbone = getattr(unwrap(model), "backbone", None)
    if backbone is not None:
        backbone.to(getattr(torch, weights_dtype))
    return model


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW: pretrained transformer parameters (backbone, BERT positions) at `lr`, the rest at `head_lr`.

    `train.optimizer` picks the implementation ("auto": fused where the parameters are on CUDA); with
    `train.cuda_graph` it is capturable (step counts on the device), as a captured step needs.
    """
    pretrained, new = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (pretrained if name.startswith(("backbone.", "positions.")) else new).append(param)
    groups = [{"params": p, "lr": lr} for p, lr in ((pretrained, tc.lr), (new, tc.head_lr)) if p]
    on_cuda = groups[0]["params"][0].device.type == "cuda"
    implementation = {
        "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
        "auto": {"fused": True} if on_cuda else {},
    }[tc.optimizer]
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay, capturable=tc.cuda_graph, **implementation)


def initial_model(kind: ModelKind, cfg: Config) -> nn.Module:
    """A seeded fresh model in `train.weights_dtype`, or the weights of `train.resume_from` (warm start,
    same architecture)."""
    seed_everything(cfg.train.seed)
    model = cast_weights(build_model(kind, cfg), cfg.train.weights_dtype)
    if cfg.train.resume_from:
        previous = read_meta(cfg.train.resume_from, cfg.storage)
        if previous.model_kind != kind:
            raise ValueError(f"train.resume_from holds a {previous.model_kind!r} model, not {kind!r}")
        meta = load_weights(cfg.train.resume_from, model, cfg.storage)
        log.info("warm start from %s (epoch %d)", cfg.train.resume_from, meta.epoch)
    return model


def logits(model: nn.Module, batch: ModelBatch, table: DeviceTable | None = None) -> Tensor:
    """The model's logits of `batch`: rows gathered from `table` when the batch carries rows, and the
    padding known on the host passed on (the id baseline has no attention mask to check)."""
    tensors = table.expand(batch.tensors) if table is not None else batch.tensors
    if isinstance(unwrap(model), IdCTR):
        return model(tensors)
    return model(tensors, padded=batch.padded)


@functools.cache
def capture_stream(device: int) -> torch.cuda.Stream:
    """The side stream of every CUDA graph's warm-up and capture on a device. cuBLAS keeps a workspace
    per stream for the life of the process: a new stream per graph kept 68 MB each (H200)."""
    return torch.cuda.Stream(device)


class GraphedStep:
    """A training step of fixed shapes captured once as one CUDA graph, then replayed.

    A replay is a single launch, so the step's Python, autograd and per-kernel launch costs are
    gone: what small batches are bound by. The step must not read device values on the host, and
    its optimizer must be capturable; lazy state (the optimizer's moments, compiled variants) must
    exist before, from eager steps on `capture_stream`. Capturing runs nothing; each call copies its
    inputs into the graph's buffers and replays. What the step allocates stays in the graph's private
    pool while it lives. Other threads (the batch prefetch) may use the GPU during the capture.
    """

    def __init__(self, step: Callable[[dict[str, Tensor]], Tensor], inputs: dict[str, Tensor]) -> None:
        self.inputs = {key: value.clone() for key, value in inputs.items()}
        side = capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda.empty_cache()  # the warm-up's cached blocks: reserved memory is then the graph's own
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.output = step(self.inputs)

    def __call__(self, inputs: dict[str, Tensor]) -> Tensor:
        for key, value in inputs.items():
            self.inputs[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output


@dataclass
class _Shape:
    """The graph of one input shape: its eager warm-up steps so far, then the captured step."""

    padded: bool
    warm: int = 0
    graph: GraphedStep | None = None


class TrainStep:
    """One optimisation step as `train.*` configures it: `step(batch, labels)` returns the loss on the
    device (no host sync).

    Forward (under `train.precision` autocast, the batch's host-known padding passed to the model),
    BCE loss, backward, gradient clipping (`train.grad_clip`), AdamW, gradients dropped. BAHE batches
    of device-table rows are gathered first, inside the step. `train.compile` compiles the model's
    transformer layers here (regional: identical layers share one graph). With `train.cuda_graph` each
    input shape runs GRAPH_WARMUP eager steps, then is captured once (`GraphedStep`) and replayed; one
    graph per shape, captured with padding unless the first batches had none (a padded batch then
    recaptures it; a graph with the mask serves unpadded batches too).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, tc: TrainConfig,
                 device: str | torch.device, table: DeviceTable | None = None) -> None:
        self.device = torch.device(device)
        if tc.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graph: the whole-step CUDA graph needs a CUDA device, not {str(device)!r}")
        self.model, self.optimizer, self.table, self.graphed = model, optimizer, table, tc.cuda_graph
        self.params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.grad_clip = tc.grad_clip
        self.dtype = autocast_dtype(tc.precision, device)
        self.shapes: dict[tuple, _Shape] = {}
        backbone = getattr(unwrap(model), "backbone", None)
        if tc.compile and backbone is not None:
            backbone.compile_layers(tc.compile_mode)

    @property
    def capture_calls(self) -> int:
        """Calls of a new shape before it runs as a replay: the warm-up and the capture (0 when eager)."""
        return GRAPH_WARMUP + 1 if self.graphed else 0

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory (a shape seen again warms up and captures anew)."""
        self.shapes.clear()

    def __call__(self, batch: ModelBatch, labels: Tensor) -> Tensor:
        if not self.graphed:
            return self._step(batch, labels)
        inputs = batch.tensors | {LABELS: labels}
        key = tuple((name, tuple(value.shape), value.dtype) for name, value in sorted(inputs.items()))
        shape = self.shapes.get(key)
        if shape is None or (batch.padded and not shape.padded):
            shape = self.shapes[key] = _Shape(batch.padded)  # a recapture frees the unpadded graph first
        if shape.graph is None and shape.warm < GRAPH_WARMUP:
            shape.warm += 1
            return self._on_capture_stream(ModelBatch(batch.tensors, shape.padded), labels)
        if shape.graph is None:
            shape.graph = GraphedStep(functools.partial(self._captured, padded=shape.padded), inputs)
        return shape.graph(inputs).clone()

    def _step(self, batch: ModelBatch, labels: Tensor, cache: bool = True) -> Tensor:
        with autocast(self.device, self.dtype, cache):
            out = logits(self.model, batch, self.table)
        loss = F.binary_cross_entropy_with_logits(out.float(), labels)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # before the next forward: its peak holds no gradients
        return loss.detach()

    def _captured(self, inputs: dict[str, Tensor], padded: bool) -> Tensor:
        tensors = {key: value for key, value in inputs.items() if key != LABELS}
        return self._step(ModelBatch(tensors, padded), inputs[LABELS], cache=False)

    def _on_capture_stream(self, batch: ModelBatch, labels: Tensor) -> Tensor:
        """An eager warm-up step on the side stream the capture will use, ordered with the current stream."""
        side = capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._step(batch, labels, cache=False)
        torch.cuda.current_stream().wait_stream(side)
        return loss
