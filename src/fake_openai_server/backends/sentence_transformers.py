"""Backends over sentence-transformers models (SentenceTransformer, CrossEncoder).

The model is loaded the way sentence-transformers loads it; inference calls the
model's own modules on token ids prepared once by :meth:`tokenize`, so the
numbers are those of ``encode`` / ``predict`` without a second tokenization.
"""

from __future__ import annotations

import copy
import logging
import platform
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fake_openai_server.backends.base import Encoded, FloatArray, ModelInfo, TokenIds

log = logging.getLogger(__name__)

# Text is cut to this many characters per allowed token before it reaches the
# word tokenizer: no token is longer, and MeCab (fugashi) crashes the whole
# process on inputs of a few hundred thousand characters.
CHARS_PER_TOKEN_CAP = 16
MAX_TOKENIZER_CHARS = 50_000


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: str  # float32 | bfloat16 | float16 | int8
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype, torch.float32)


def cpu_has_native_bfloat16() -> bool:
    """True when the processor computes bfloat16 in hardware (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(device: str, dtype: str) -> Precision:
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype != "auto":
        return Precision(device, dtype, f"DTYPE={dtype}")
    if device.startswith("cuda"):
        return Precision(device, "float16", "CUDA: half precision")
    if device == "cpu" and cpu_has_native_bfloat16():
        return Precision(device, "bfloat16", "CPU with native bfloat16 (avx512_bf16/amx)")
    return Precision(device, "float32", f"{device}: no native bfloat16")


def configure_threads(cpu_threads: int | None) -> None:
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)


class _PerThreadTokenizer:
    """HF tokenizers are not safe to share between threads: one copy per thread."""

    def __init__(self, tokenizer: Any) -> None:
        self._prototype = tokenizer
        self._local = threading.local()
        self._lock = threading.Lock()

    def get(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:
                tokenizer = copy.deepcopy(self._prototype)
            self._local.tokenizer = tokenizer
        return tokenizer


def _quantize_int8(module: torch.nn.Module) -> None:
    """Dynamic int8 quantisation of every Linear layer (CPU only), in place."""
    torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )


class _TorchRunner:
    """Pads a batch of token ids and runs the sentence-transformers modules."""

    def __init__(self, model: Any, precision: Precision, pad_id: int, output: str) -> None:
        self.model = model
        self.precision = precision
        self.pad_id = pad_id
        self.output = output
        self.device = torch.device(precision.device)

    def run(self, batch: Sequence[TokenIds]) -> torch.Tensor:
        try:
            return self._run(batch)
        except torch.cuda.OutOfMemoryError:
            # The batch fails (its requests get 500); give back what it left cached so
            # that the next batches can run.
            torch.cuda.empty_cache()
            raise

    @torch.inference_mode()
    def _run(self, batch: Sequence[TokenIds]) -> torch.Tensor:
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        features = {
            "input_ids": input_ids.to(self.device, non_blocking=True),
            "attention_mask": attention.to(self.device, non_blocking=True),
        }
        out: torch.Tensor = self.model(features)[self.output]
        return out.float().cpu()


def _load_common(precision: Precision) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"device": precision.device}
    if precision.dtype in ("bfloat16", "float16"):
        kwargs["model_kwargs"] = {"dtype": precision.torch_dtype}
    return kwargs


def _max_length(model_max: int | None, requested: int | None) -> int:
    model_max = model_max or 512
    return min(model_max, requested) if requested else model_max


def _cut(text: str, max_length: int) -> str:
    return text[: min(max_length * CHARS_PER_TOKEN_CAP, MAX_TOKENIZER_CHARS)]


def _end_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer appends after the text ([SEP] for BERT, </s> for ruri-v3).

    A cut sequence keeps them, as the tokenizer's own truncation does.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[start + len(plain) :])
    return []


def _encode_one(ids: list[int], max_length: int, end: list[int]) -> Encoded:
    """Cut ``ids`` (tokenized to max_length + 1) to max_length, keeping the end tokens."""
    if len(ids) <= max_length:
        return Encoded(ids, truncated=False, original_length=len(ids))
    cut = ids[: max_length - len(end)] + end
    return Encoded(cut, truncated=True, original_length=len(ids))


class _LoadedModel:
    """What both backends share: the model in its precision, its length, tokenizers, runner."""

    def __init__(
        self, model: Any, precision: Precision, max_seq_length: int | None, output: str
    ) -> None:
        if precision.dtype == "int8":
            _quantize_int8(model)
        model.eval()
        self.model = model
        self.precision = precision
        self.max_length = _max_length(model.max_seq_length, max_seq_length)
        model.max_seq_length = self.max_length
        tokenizer = model.tokenizer
        self.vocab_size = len(tokenizer)
        self._tokenizers = _PerThreadTokenizer(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._runner = _TorchRunner(model, precision, pad_id, output)

    def _info(self, name: str, **extra: Any) -> ModelInfo:
        return ModelInfo(
            name=name,
            max_length=self.max_length,
            vocab_size=self.vocab_size,
            dtype=self.precision.dtype,
            device=self.precision.device,
            precision_reason=self.precision.reason,
            **extra,
        )


class SentenceTransformerBackend(_LoadedModel):
    """Embeddings from a ``SentenceTransformer`` (Transformer + Pooling [+ Normalize])."""

    def __init__(self, name: str, precision: Precision, max_seq_length: int | None) -> None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(name, **_load_common(precision))
        super().__init__(model, precision, max_seq_length, "sentence_embedding")
        self._end = _end_tokens(model.tokenizer)
        dimension = model.get_embedding_dimension()
        self.info = self._info(name, dimension=int(dimension) if dimension is not None else None)

    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        tokenizer = self._tokenizers.get()
        cut = [_cut(text, self.max_length) for text in texts]
        ids = tokenizer(cut, truncation=True, max_length=self.max_length + 1)["input_ids"]
        return [_encode_one(list(row), self.max_length, self._end) for row in ids]

    def wrap_ids(self, ids: TokenIds) -> Encoded:
        tokenizer = self._tokenizers.get()
        wrapped = tokenizer.build_inputs_with_special_tokens(list(ids))
        return _encode_one(list(wrapped), self.max_length, self._end)

    def embed(self, batch: Sequence[TokenIds]) -> FloatArray:
        result: FloatArray = self._runner.run(batch).numpy()
        return result


class CrossEncoderBackend(_LoadedModel):
    """Scores from a ``CrossEncoder`` (a sequence-classification model, one label)."""

    def __init__(self, name: str, precision: Precision, max_seq_length: int | None) -> None:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(name, **_load_common(precision))
        super().__init__(model, precision, max_seq_length, "scores")
        self._activation: Callable[[torch.Tensor], torch.Tensor] = (
            model.activation_fn or torch.nn.Identity()
        )
        self.info = self._info(name, extra={"activation": type(self._activation).__name__})

    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> list[Encoded]:
        tokenizer = self._tokenizers.get()
        query = _cut(query, self.max_length)
        docs = [_cut(doc, self.max_length) for doc in documents]
        ids = tokenizer(
            [query] * len(docs), docs, truncation="longest_first", max_length=self.max_length
        )["input_ids"]
        return [Encoded(list(row), original_length=len(row)) for row in ids]

    def score(self, batch: Sequence[TokenIds]) -> FloatArray:
        logits = self._runner.run(batch)
        if logits.ndim > 1:
            logits = logits[:, 0]
        result: FloatArray = logits.numpy()
        return result

    def activate(self, logits: FloatArray) -> FloatArray:
        result: FloatArray = self._activation(torch.from_numpy(logits)).numpy()
        return result
