"""Models over sentence-transformers (SentenceTransformer, CrossEncoder), in the engine process.

The model is loaded the way sentence-transformers loads it; a forward pass calls the
model's own modules on token ids tokenized once in the server process, so the numbers
are those of ``encode`` / ``predict`` without a second tokenization. The tokenizer is
saved for the server process (``export_tokenizer``).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fake_openai_server.backends.base import (
    Done,
    FloatArray,
    IdArray,
    ModelInfo,
    Pending,
    Task,
)

log = logging.getLogger(__name__)


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


def _quantize_int8(module: torch.nn.Module) -> None:
    """Dynamic int8 quantisation of every Linear layer (CPU only), in place."""
    torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )


class _OnDevice:
    """A batch launched on a GPU: its rows are copied back once its kernels have run."""

    def __init__(self, rows: torch.Tensor) -> None:
        self._host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
        self._host.copy_(rows, non_blocking=True)
        self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._done.record()

    def result(self) -> FloatArray:
        self._done.synchronize()  # waits without the GIL
        rows: FloatArray = self._host.numpy()
        return rows


class _TorchRunner:
    """Pads a batch of token ids and runs the sentence-transformers modules.

    On CUDA, ``launch`` returns as soon as the kernels are queued, so the engine can
    queue the next batch while this one runs; on CPU the pass runs inside ``launch``.
    """

    def __init__(
        self, model: Any, precision: Precision, pad_id: int, forward: Callable[..., torch.Tensor]
    ) -> None:
        self.model = model
        self.precision = precision
        self.pad_id = pad_id
        self.forward = forward
        self.device = torch.device(precision.device)
        self.cuda = self.device.type == "cuda"

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        try:
            return self._launch(batch)
        except torch.cuda.OutOfMemoryError:
            # The batch fails (its requests get 500); give back what it left cached so
            # that the next batches can run.
            torch.cuda.empty_cache()
            raise

    @torch.inference_mode()
    def _launch(self, batch: Sequence[IdArray]) -> Pending:
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        longest = int(lengths.max())
        ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        for row, item in enumerate(batch):
            ids[row, : len(item)] = item
        mask = (np.arange(longest) < lengths[:, None]).astype(np.int64)
        input_ids, attention = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.cuda:
            input_ids, attention = input_ids.pin_memory(), attention.pin_memory()
        features = {
            "input_ids": input_ids.to(self.device, non_blocking=True),
            "attention_mask": attention.to(self.device, non_blocking=True),
        }
        out = self.forward(features).float()
        if self.cuda:
            return _OnDevice(out)
        rows: FloatArray = out.numpy()
        return Done(rows)


def _load_common(precision: Precision) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"device": precision.device}
    if precision.dtype in ("bfloat16", "float16"):
        kwargs["model_kwargs"] = {"dtype": precision.torch_dtype}
    return kwargs


def _max_length(model_max: int | None, requested: int | None) -> int:
    model_max = model_max or 512
    return min(model_max, requested) if requested else model_max


class _LoadedModel:
    """What both models share: the model in its precision, its length, the runner."""

    task: Task

    def __init__(
        self, name: str, model: Any, precision: Precision, max_seq_length: int | None
    ) -> None:
        if precision.dtype == "int8":
            _quantize_int8(model)
        model.eval()
        self.name = name
        self.model = model
        self.precision = precision
        self.max_length = _max_length(model.max_seq_length, max_seq_length)
        model.max_seq_length = self.max_length
        tokenizer = model.tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _info(self, **extra: Any) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            task=self.task,
            max_length=self.max_length,
            vocab_size=self.vocab_size,
            dtype=self.precision.dtype,
            device=self.precision.device,
            precision_reason=self.precision.reason,
            **extra,
        )

    def export_tokenizer(self, folder: str) -> None:
        self.model.tokenizer.save_pretrained(folder)


class SentenceTransformerModel(_LoadedModel):
    """Embeddings from a ``SentenceTransformer`` (Transformer + Pooling [+ Normalize])."""

    task: Task = "embeddings"

    def __init__(self, name: str, precision: Precision, max_seq_length: int | None) -> None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(name, **_load_common(precision))
        super().__init__(name, model, precision, max_seq_length)
        dimension = model.get_embedding_dimension()
        self.info = self._info(dimension=int(dimension) if dimension is not None else None)
        self._runner = _TorchRunner(model, precision, self.pad_id, self._forward)

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.model(features)["sentence_embedding"]
        return out

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        return self._runner.launch(batch)


class CrossEncoderModel(_LoadedModel):
    """Scores from a ``CrossEncoder`` (a sequence-classification model, one label)."""

    task: Task = "rerank"

    def __init__(self, name: str, precision: Precision, max_seq_length: int | None) -> None:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(name, **_load_common(precision))
        super().__init__(name, model, precision, max_seq_length)
        self._activation: Callable[[torch.Tensor], torch.Tensor] = (
            model.activation_fn or torch.nn.Identity()
        )
        self.info = self._info()
        self._runner = _TorchRunner(model, precision, self.pad_id, self._forward)

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.model(features)["scores"]
        if logits.ndim > 1:
            logits = logits[:, 0]
        logits = logits.float()
        # Both columns of RERANK_COLUMNS: the raw logit and the model's own activation.
        return torch.stack([logits, self._activation(logits)], dim=1)

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        return self._runner.launch(batch)
