"""The shallow encoder equals the full model's layer-k hidden state, pooled, and is padding-invariant."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from bahe_ray.config import MINILM, EncoderConfig
from bahe_ray.encoders import build_encoder, choose_encoder, encoder_fingerprint
from bahe_ray.encoders.base import BackendChoice
from bahe_ray.encoders.hf import TransformersEncoder, length_batches
from bahe_ray.encoders.select import calibration_key, calibration_texts, decide, key_id, read_table, record
from bahe_ray.encoders.truncate import write_truncated_checkpoint
from bahe_ray.models.registry import resolve_model_path

TEXTS = [
    "Purchase nike shoes for 12 dollars",
    "Search lamp",
    "rated 4 : toy story ( 1995 ) then a much longer tail of words apple ikea lego sony zara",
    "Purchase starbucks coffee",
    "rated 1 : heat ( 1995 )",
]


def reference_vectors(path: Path, k: int, pooling: str, texts: list[str], max_tokens: int) -> np.ndarray:
    """Each text alone through the full AutoModel: hidden_states[k] (+ final norm for decoders), pooled."""
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[k][0]
            if hasattr(model, "norm"):
                hidden = model.norm(hidden)
        rows.append(hidden.mean(0) if pooling == "mean" else hidden[-1])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "minilm_path"])
def test_encoder_matches_full_model(model: str, pooling: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    k = 2
    encoder = TransformersEncoder(EncoderConfig(model=str(path), k=k, pooling=pooling, max_tokens=16))
    batch = encoder.encode(TEXTS)  # mixed lengths, one truncated to max_tokens
    assert batch.shape == (len(TEXTS), encoder.dim) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, reference_vectors(path, k, pooling, TEXTS, 16), atol=1e-5, rtol=0)
    for i, text in enumerate(TEXTS):  # the same text alone gives the same vector as in the batch
        np.testing.assert_allclose(encoder.encode([text])[0], batch[i], atol=1e-5, rtol=0)
    assert not np.allclose(batch[0], batch[3], atol=1e-3)  # different texts, different vectors


def test_micro_batches_cover_every_text_once() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = length_batches(lengths, max_batch_tokens=10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 10 or len(b) == 1 for b in batches)
    encoder_order = [lengths[i] for b in batches for i in b]
    assert encoder_order == sorted(lengths)


def test_small_token_budget_gives_same_vectors(tiny_llama: Path) -> None:
    cfg = EncoderConfig(model=str(tiny_llama), k=3, pooling="mean")
    wide = TransformersEncoder(cfg).encode(TEXTS)
    narrow = TransformersEncoder(cfg, max_batch_tokens=8).encode(TEXTS)
    np.testing.assert_allclose(narrow, wide, atol=1e-5, rtol=0)
    assert TransformersEncoder(cfg).encode([]).shape == (0, 128)


def test_fingerprint_tracks_k_pooling_and_weights(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = EncoderConfig(model=str(tiny_llama), k=2, pooling="mean")
    base = encoder_fingerprint(cfg, "cpu")
    assert base.dtype == "float32" and base.model_name == tiny_llama.name
    assert encoder_fingerprint(cfg, "cuda").dtype == "bfloat16"
    assert encoder_fingerprint(cfg.model_copy(update={"k": 3}), "cpu").id != base.id
    assert encoder_fingerprint(cfg.model_copy(update={"pooling": "last"}), "cpu").id != base.id

    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    other = encoder_fingerprint(cfg.model_copy(update={"model": str(changed)}), "cpu")
    assert other.weights_sha256 != base.weights_sha256 and other.id != base.id


def test_minilm_default_name(minilm_path: Path) -> None:
    assert resolve_model_path(MINILM) == minilm_path
    assert encoder_fingerprint(EncoderConfig(), "cpu").model_name == "all-MiniLM-L6-v2"


def test_missing_model_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="encoder.model"):
        resolve_model_path(str(tmp_path / "nope"))


def test_auto_picks_transformers_without_gpu(tiny_llama: Path) -> None:
    encoder, choice = choose_encoder(EncoderConfig(model=str(tiny_llama), k=1, backend="auto"), "cpu")
    assert isinstance(encoder, TransformersEncoder) and choice == BackendChoice("transformers", "no GPU")
    assert isinstance(build_encoder(EncoderConfig(model=str(tiny_llama), k=1, backend="auto"), "cpu"), TransformersEncoder)


def test_auto_decides_by_the_measured_rates() -> None:
    assert decide("cuda", True, {"transformers": 15_000.0, "vllm": 31_000.0}, "table").backend == "vllm"
    slower = decide("cuda", True, {"transformers": 15_000.0, "vllm": 3_000.0}, "measured")
    assert slower.backend == "transformers" and "15,000" in slower.reason and "3,000" in slower.reason
    assert decide("cuda", True, {"transformers": 5.0, "vllm": 5.0}).backend == "transformers"  # a tie: no engine
    assert decide("cuda", False, None) == BackendChoice("transformers", "no CUDA build of vLLM installed")
    assert decide("cpu", True, {"transformers": 1.0, "vllm": 9.0}).backend == "transformers"
    with pytest.raises(ValueError, match="both backends"):
        decide("cuda", True, {"vllm": 9.0})


def test_calibration_table_is_keyed_by_shape_and_settings_not_weights(tmp_path: Path) -> None:
    """Two random-weight checkpoints of one shape share a key; k, an engine setting or the shape change it;
    a recorded measurement reads back (and an unreadable table reads as empty: measured again)."""
    from tiny_models import build_tiny_model

    a, b = build_tiny_model(tmp_path / "a", "qwen2", seed=0), build_tiny_model(tmp_path / "b", "qwen2", seed=1)
    cfg = EncoderConfig(model=str(a), k=2, cache_dir=str(tmp_path / "cache"))
    key = calibration_key(cfg, "cpu")
    assert key_id(calibration_key(cfg.model_copy(update={"model": str(b)}), "cpu")) == key_id(key)
    for update in ({"k": 1}, {"vllm_max_num_seqs": 64}, {"model": str(build_tiny_model(tmp_path / "l", "llama"))}):
        assert key_id(calibration_key(cfg.model_copy(update=update), "cpu")) != key_id(key), update
    assert read_table(cfg) == {}
    record(cfg, key, {"transformers": 10.0, "vllm": 20.0})
    entry = read_table(cfg)[key_id(key)]
    assert entry["atoms_per_s"] == {"transformers": 10.0, "vllm": 20.0} and entry["key"]["shape"]["hidden_size"] == 128
    (tmp_path / "cache" / "calibration.json").write_text("{not json")
    assert read_table(cfg) == {}


def test_calibration_texts_are_distinct_and_behaviour_sized() -> None:
    texts = calibration_texts(200, 64)
    assert len(set(texts)) == 200 and all(len(t.split()) == 16 for t in texts)
    assert texts == calibration_texts(200, 64) != calibration_texts(200, 64, seed=1)


def test_vllm_engine_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder's vllm_* fields reach the engine; eager on CPU, CUDA graphs on a GPU unless set; on a GPU
    without flashinfer the sampler is switched off before vLLM starts, and the engine stays in-process."""
    from bahe_ray.encoders.vllm import engine_arguments, engine_environment

    assert engine_arguments(EncoderConfig(), "cpu") == {"enforce_eager": True}
    assert engine_arguments(EncoderConfig(), "cuda") == {"enforce_eager": False}
    cfg = EncoderConfig(vllm_max_num_batched_tokens=65536, vllm_max_num_seqs=2048, vllm_enforce_eager=True,
                        vllm_chunked_prefill=False, vllm_prefix_caching=False,
                        vllm_engine_args={"async_scheduling": True})
    assert engine_arguments(cfg, "cuda") == {
        "enforce_eager": True, "max_num_batched_tokens": 65536, "max_num_seqs": 2048,
        "enable_chunked_prefill": False, "enable_prefix_caching": False, "async_scheduling": True,
    }
    with pytest.raises(ValueError, match="vllm_engine_args.*max_model_len"):
        EncoderConfig(vllm_engine_args={"max_model_len": 8})
    for name in ("VLLM_USE_FLASHINFER_SAMPLER", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(name, raising=False)
    engine_environment("cpu")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "VLLM_USE_FLASHINFER_SAMPLER" not in os.environ
    engine_environment("cuda")
    has_flashinfer = importlib.util.find_spec("flashinfer") is not None
    assert os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") == (None if has_flashinfer else "0")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine_environment("cuda")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # the user's own setting wins


@pytest.mark.parametrize("model", ["tiny_qwen2", "minilm_path"])
def test_truncated_checkpoint_gives_same_vectors(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = request.getfixturevalue(model)
    k = 2
    out = write_truncated_checkpoint(path, k, tmp_path / "trunc")
    loaded, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert loaded.config.num_hidden_layers == k and not info["missing_keys"]
    layers = loaded.layers if hasattr(loaded, "layers") else loaded.encoder.layer
    assert len(layers) == k
    assert write_truncated_checkpoint(path, k, tmp_path / "trunc") == out  # an existing one is reused

    full = TransformersEncoder(EncoderConfig(model=str(path), k=k)).encode(TEXTS)
    truncated = TransformersEncoder(EncoderConfig(model=str(out), k=k)).encode(TEXTS)
    np.testing.assert_array_equal(truncated, full)


def test_atom_tokenizer_gives_the_transformers_tokens(minilm_path: Path, tiny_llama: Path) -> None:
    """Both encoder backends tokenise with AtomTokenizer: exactly `token_ids`' tokens, special tokens and
    right truncation included, for an encoder (BERT) and a decoder (Llama) tokenizer."""
    from transformers import AutoTokenizer

    from bahe_ray.models.tokens import AtomTokenizer, token_ids

    texts = ["rated 5/5: Toy Story (1995) | Animation, Children's, Comedy", "a", "word " * 100, ""]
    for path in (minilm_path, tiny_llama):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        want = token_ids(tokenizer, texts, 16)
        atoms = AtomTokenizer(tokenizer, 16)
        assert atoms.ids(texts) == want and max(map(len, want)) == 16
        ids, lengths = atoms.matrix(texts)
        assert [ids[i, :n].tolist() for i, n in enumerate(lengths)] == want


def test_compiled_encoder_gives_the_same_vectors(tiny_qwen2: Path) -> None:
    """encoder.compile: torch.compile'd layers (inductor, here its CPU code) over padded and unpadded micro-batches."""
    eager = TransformersEncoder(EncoderConfig(model=str(tiny_qwen2), k=2)).encode(TEXTS)
    compiled = TransformersEncoder(EncoderConfig(model=str(tiny_qwen2), k=2, compile=True), max_batch_tokens=32)
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in compiled.backbone.layers)
    np.testing.assert_allclose(compiled.encode(TEXTS), eager, atol=1e-4, rtol=0)
    np.testing.assert_allclose(compiled.encode(TEXTS[:1] * 3), eager[[0, 0, 0]], atol=1e-4, rtol=0)


def test_compile_is_refused_for_vllm() -> None:
    with pytest.raises(ValueError, match="encoder.compile"):
        EncoderConfig(backend="vllm", compile=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_calls_put_every_vector_in_its_row(tiny_llama: Path, device: str) -> None:
    """Chunks tokenised ahead and copied back one by one (pinned and asynchronous from a GPU) land in input order."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = EncoderConfig(model=str(tiny_llama), k=2, dtype="float32")
    whole = TransformersEncoder(cfg, device="cpu").encode(TEXTS * 3)
    chunked = TransformersEncoder(cfg, device=device)
    chunked.chunk_texts = 2  # 8 chunks of at most 2 texts
    np.testing.assert_allclose(chunked.encode(TEXTS * 3), whole, atol=1e-4, rtol=0)
