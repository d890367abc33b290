"""Models over sentence-transformers (SentenceTransformer, CrossEncoder), in the engine process.

The model is loaded the way sentence-transformers loads it; a forward pass calls the
model's own modules on token ids tokenized once in the server process, so the numbers
are those of ``encode`` / ``predict`` without a second tokenization. The tokenizer is
saved for the server process (``export_tokenizer``).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from fake_openai_server.backends import hub
from fake_openai_server.backends.base import (
    Done,
    FloatArray,
    IdArray,
    LoadError,
    ModelInfo,
    Padding,
    Pending,
    Task,
)
from fake_openai_server.cpus import usable_cores
from fake_openai_server.settings import SettingsError

log = logging.getLogger(__name__)

_Loaded = TypeVar("_Loaded")


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


def _why_no_gpu() -> str:
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU from it"
    if found := visible_gpu():
        return f"one is present ({found}), so the NVIDIA driver may be older than it needs"
    return (
        "none was given to this process (docker: --gpus all; compose: the service's "
        "deploy.resources.reservations.devices)"
    )


def visible_gpu() -> str | None:
    """What says this process was given an NVIDIA GPU (a container's GPU reservation, a
    device node), whether or not torch can use it."""
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    if visible and visible not in ("void", "none"):
        return f"NVIDIA_VISIBLE_DEVICES={visible}"
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    return None


def resolve_precision(device: str, dtype: str) -> Precision:
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
            if gpu := visible_gpu():
                # A GPU host whose driver is older than this torch's CUDA needs (R580 for
                # CUDA 13) served on the CPU, many times slower, and said so nowhere.
                log.warning(
                    "a GPU is present (%s) but torch %s cannot use it (CUDA %s; is the "
                    "NVIDIA driver older than it needs?): running on the CPU. Set "
                    "DEVICE=cuda to refuse to start without it",
                    gpu,
                    torch.__version__,
                    torch.version.cuda,
                )
    elif device == "cuda" and not torch.cuda.is_available():
        # Said before the model loads (it had failed after, in torch's words, exit 1).
        raise SettingsError(
            f"DEVICE=cuda, but torch {torch.__version__} (CUDA {torch.version.cuda}) can use "
            f"no GPU: {_why_no_gpu()}. DEVICE=auto runs on the CPU instead"
        )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("DEVICE=mps, but this machine has no Apple GPU that torch can use")
    if dtype == "float16" and device == "cpu":  # DEVICE=auto found no GPU
        raise SettingsError(
            "DTYPE=float16 needs a GPU, and none was found; on CPU use DTYPE=auto, bfloat16 "
            "or float32"
        )
    if dtype == "int8" and device != "cpu":
        raise SettingsError(
            f"DTYPE=int8 runs on CPU only, and the device is {device}; on a GPU use "
            "DTYPE=auto (float16), or set DEVICE=cpu"
        )
    if dtype != "auto":
        return Precision(device, dtype, f"DTYPE={dtype}")
    if device.startswith("cuda"):
        return Precision(device, "float16", "CUDA: half precision")
    if device == "cpu" and cpu_has_native_bfloat16():
        return Precision(device, "bfloat16", "CPU with native bfloat16 (avx512_bf16/amx)")
    return Precision(device, "float32", f"{device}: no native bfloat16")


def configure_threads(cpu_threads: int | None) -> None:
    """torch's threads: CPU_THREADS where set, else torch's own count (the machine's
    cores) cut to what a container's CPU limit allows (``cpus.py``)."""
    if cpu_threads is None:
        cpu_threads = min(torch.get_num_threads(), usable_cores())
    torch.set_num_threads(cpu_threads)


def _quantize_int8(module: torch.nn.Module) -> None:
    """Dynamic int8 quantisation of every Linear layer (CPU only), in place."""
    torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
        module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
    )


class _OnDevice:
    """A batch launched on a GPU: its rows are copied back once its kernels have run."""

    def __init__(self, rows: torch.Tensor, graph: bool = False) -> None:
        self.graph = graph
        self._host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
        self._host.copy_(rows, non_blocking=True)
        self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._done.record()

    def result(self) -> FloatArray:
        self._done.synchronize()  # waits without the GIL
        rows: FloatArray = self._host.numpy()
        return rows


# On CUDA a batch is padded to one of a few shapes. A forward pass of a shape the GPU
# has not seen costs several milliseconds more (GEMM algorithm choice, new memory
# blocks); with free lengths and batch sizes nearly every batch is a new shape, and a
# small pass took twice as long as the model alone (H200,
# bench/results/full-cuda-after.md). With lengths rounded up to LENGTH_STEP and batch
# sizes to BATCH_SIZES (the model's ``Padding``), every shape within MAX_BATCH_TOKENS
# and up to WARM_LENGTH tokens is run once at start-up, and the engine forms only
# batches whose padded shape is within MAX_BATCH_TOKENS, so each batch takes a warmed
# (and captured) shape; a longer one (of an 8192-token model) is warmed the first time a
# batch takes it. Padded tokens are masked out; on CPU, where they cost compute in
# proportion, batches are not padded beyond their longest item.
LENGTH_STEP = 32
LONG_STEP = 256  # beyond WARM_LENGTH (8192-token models): coarser, warmed on first sight
WARM_LENGTH = 1024
BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)


# With CUDA_GRAPHS, the forward pass of every warmed shape is also captured as a CUDA
# graph: replaying it queues the whole pass in one call, where the eager pass queues a
# few hundred kernels from Python. On the H200's host an eager pass of ruri-large cost
# ~17 ms of Python whatever the batch (one text or 32: bench/results/full-cuda-after-
# buckets.md), so small batches kept the GPU waiting. The graphs share one memory pool:
# they never run at once (one stream), and each replay's rows are copied out before the
# next replay is queued. A model whose pass cannot be captured, or whose replay does not
# give the eager pass's numbers (checked once at start-up), runs eagerly.
GRAPH_CHECK_TOLERANCE = 1e-2  # largest difference from the eager pass, relative to its scale


@dataclass
class _Graph:
    """One padded shape's forward pass, captured, with the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    out: torch.Tensor


class _TorchRunner:
    """Pads a batch of token ids and runs the sentence-transformers modules.

    On CUDA, ``launch`` returns as soon as the kernels are queued, so the engine can
    queue the next batch while this one runs; on CPU the pass runs inside ``launch``.
    """

    def __init__(
        self,
        precision: Precision,
        pad_id: int,
        max_length: int,
        forward: Callable[..., torch.Tensor],
        *,
        graphs: bool,
        vocab_size: int,
    ) -> None:
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.forward = forward
        self.device = torch.device(precision.device)
        self.cuda = self.device.type == "cuda"
        self.use_graphs = graphs and self.cuda
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.padding = (
            Padding(BATCH_SIZES, LENGTH_STEP, LONG_STEP, WARM_LENGTH, max_length)
            if self.cuda
            else Padding()
        )

    def warm_shapes(self, max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
        """Every padded shape traffic can bring, largest first (CUDA; none on CPU)."""
        return self.padding.shapes(max_rows, max_tokens)

    @torch.inference_mode()
    def capture(self, shapes: Sequence[tuple[int, int]]) -> int:
        """Capture the pass of each shape as a CUDA graph (largest first); how many were.

        The shapes have run eagerly already (kernels chosen, memory reserved). Nothing is
        captured off CUDA or without CUDA_GRAPHS; on any failure none is kept.
        """
        if not self.use_graphs or not shapes:
            return 0
        try:
            # torch.cuda.graph() would collect garbage and empty the cache around each
            # capture (a second or more per hundred shapes): capture on one side stream.
            side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(self.device))
            pool = None
            with torch.cuda.stream(side):
                for rows, length in shapes:
                    input_ids = torch.full((rows, length), self.pad_id, device=self.device)
                    attention_mask = torch.zeros_like(input_ids)
                    attention_mask[:, 0] = 1
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=pool)
                    try:
                        out = self._pass(input_ids, attention_mask)
                    finally:
                        graph.capture_end()
                    pool = graph.pool()
                    self._graphs[rows, length] = _Graph(graph, input_ids, attention_mask, out)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._check_graphs()
        except Exception as exc:  # any failure means: run eagerly
            log.warning(
                "CUDA graphs not used (the pass runs eagerly): %s: %s", type(exc).__name__, exc
            )
            self._graphs.clear()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return len(self._graphs)

    def _check_graphs(self) -> None:
        """Replay one small shape on varied input and compare with the eager pass."""
        rows, length = min(self._graphs, key=lambda shape: (shape[0] < 3, shape))
        generator = np.random.default_rng(0)
        high = max(2, min(1000, self.vocab_size))  # ids the model has: a wrong one asserts
        batch = [
            generator.integers(1, high, size=max(1, length * share // 4), dtype=np.int32)
            for share in (4, 3, 1)[:rows]
        ]
        replayed = self._launch(batch).result()
        self.use_graphs = False
        try:
            eager = self._launch(batch).result()
        finally:
            self.use_graphs = True
        scale = max(float(np.abs(eager).max()), 1.0)
        difference = float(np.abs(replayed - eager).max()) / scale
        if not difference <= GRAPH_CHECK_TOLERANCE:
            raise RuntimeError(f"the replayed pass differs from the eager one by {difference:.3g}")

    def _pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward({"input_ids": input_ids, "attention_mask": attention_mask}).float()

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
        rows, longest = self.padding.shape(len(batch), int(lengths.max()))
        ids = np.full((rows, longest), self.pad_id, dtype=np.int64)
        for row, item in enumerate(batch):
            ids[row, : len(item)] = item
        # Rows added to reach the shape see one token (a row of nothing but padding
        # would divide by zero); their outputs are dropped.
        lengths = np.concatenate([lengths, np.ones(rows - len(batch), dtype=np.int64)])
        mask = (np.arange(longest) < lengths[:, None]).astype(np.int64)
        input_ids, attention = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.cuda:
            input_ids, attention = input_ids.pin_memory(), attention.pin_memory()
            graph = self._graphs.get((rows, longest)) if self.use_graphs else None
            if graph is not None:
                graph.input_ids.copy_(input_ids, non_blocking=True)
                graph.attention_mask.copy_(attention, non_blocking=True)
                graph.graph.replay()
                return _OnDevice(graph.out[: len(batch)], graph=True)
        out = self._pass(
            input_ids.to(self.device, non_blocking=True),
            attention.to(self.device, non_blocking=True),
        )[: len(batch)]
        if self.cuda:
            return _OnDevice(out)
        result: FloatArray = out.numpy()
        return Done(result)


def _from_hub(
    load: Callable[..., _Loaded],
    name: str,
    precision: Precision,
    cache_only: bool,
    revision: str | None,
) -> _Loaded:
    """``load(name)`` (a sentence-transformers class) onto the device in its precision, at
    ``revision`` if one is pinned."""
    from huggingface_hub.errors import RevisionNotFoundError

    kwargs: dict[str, Any] = {
        "device": precision.device,
        "local_files_only": cache_only,
        "revision": revision,
    }
    if precision.dtype in ("bfloat16", "float16"):
        kwargs["model_kwargs"] = {"dtype": precision.torch_dtype}
    try:
        return load(name, **kwargs)
    except RevisionNotFoundError:
        raise LoadError(hub.no_such_revision(name, revision)) from None
    except (OSError, TypeError) as exc:
        # A copy without its weights (OSError), or without a module's config (a TypeError
        # from sentence-transformers' constructors).
        folder = hub.cached_folder(name, revision) if cache_only else None
        if folder is None:
            raise
        raise hub.UnreadableCopy(name, folder, exc) from None


def _max_length(model_max: int | None, requested: int | None) -> int:
    model_max = model_max or 512
    return min(model_max, requested) if requested else model_max


# What a reranker's config.json names: a model with a classification head on top.
_HEAD = "ForSequenceClassification"


def _architectures(config: Any) -> list[str]:
    """The architectures a model's config.json names (none: it names none)."""
    return [str(arch) for arch in getattr(config, "architectures", None) or ()]


class _LoadedModel:
    """What both models share: the model in its precision, its length, the runner."""

    task: Task
    info: ModelInfo

    def __init__(
        self,
        name: str,
        precision: Precision,
        max_seq_length: int | None,
        graphs: bool = False,
        cache_only: bool = False,
        revision: str | None = None,
    ) -> None:
        model = _from_hub(self._open, name, precision, cache_only, revision)
        if precision.dtype == "int8":
            _quantize_int8(model)
        model.eval()
        self.model = model
        self.max_length = _max_length(model.max_seq_length, max_seq_length)
        if max_seq_length is not None and max_seq_length > self.max_length:
            log.warning(
                "MAX_SEQ_LENGTH=%d is more than %s reads: it reads at most %d tokens",
                max_seq_length,
                name,
                self.max_length,
            )
        model.max_seq_length = self.max_length
        tokenizer = model.tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._runner = _TorchRunner(
            precision,
            self.pad_id,
            self.max_length,
            self._forward,
            graphs=graphs,
            vocab_size=self.vocab_size,
        )
        self.info = ModelInfo(
            name=name,
            task=self.task,
            max_length=self.max_length,
            vocab_size=self.vocab_size,
            dtype=precision.dtype,
            device=precision.device,
            precision_reason=precision.reason,
            cpu_threads=torch.get_num_threads() if precision.device == "cpu" else 0,
            padding=self._runner.padding,
            dimension=self._dimension(),
        )

    def _open(self, name: str, **kwargs: Any) -> Any:
        """The sentence-transformers model ``name``, loaded with ``kwargs``; a
        ``SettingsError`` if it is a model of the other kind."""
        raise NotImplementedError

    def _dimension(self) -> int | None:
        """The length of the vectors it gives (None: it gives scores)."""
        return None

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def export_tokenizer(self, folder: str) -> None:
        self.model.tokenizer.save_pretrained(folder)

    def warm_shapes(self, max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
        return self._runner.warm_shapes(max_rows, max_tokens)

    def capture(self, shapes: Sequence[tuple[int, int]]) -> int:
        count = self._runner.capture(shapes)
        self.info = replace(self.info, cuda_graphs=count)
        return count

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        return self._runner.launch(batch)


class SentenceTransformerModel(_LoadedModel):
    """Embeddings from a ``SentenceTransformer`` (Transformer + Pooling [+ Normalize])."""

    task: Task = "embeddings"

    def _open(self, name: str, **kwargs: Any) -> Any:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(name, **kwargs)
        config = getattr(getattr(model[0], "auto_model", None), "config", None)
        heads = [arch for arch in _architectures(config) if arch.endswith(_HEAD)]
        if heads:
            raise SettingsError(
                f"EMBEDDINGS_MODEL={name} is a reranker (its config.json names {heads[0]}), "
                "not an embedding model: serve it as RERANKER_MODEL (SERVICE_TYPE=reranker)"
            )
        return model

    def _dimension(self) -> int | None:
        dimension = self.model.get_embedding_dimension()
        return int(dimension) if dimension is not None else None

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.model(features)["sentence_embedding"]
        return out


class CrossEncoderModel(_LoadedModel):
    """Scores from a ``CrossEncoder`` (a sequence-classification model, one label)."""

    task: Task = "rerank"

    def _open(self, name: str, **kwargs: Any) -> Any:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(name, **kwargs)
        found = _architectures(model.model.config)
        if found and not any(arch.endswith(_HEAD) for arch in found):
            # transformers gives it a head of random weights: scores that mean nothing.
            raise SettingsError(
                f"RERANKER_MODEL={name} is not a reranker: its config.json names "
                f"{', '.join(found)}, which has no classification head. Name a cross-encoder "
                "(e.g. cl-nagoya/ruri-v3-reranker-310m), or serve this model as EMBEDDINGS_MODEL"
            )
        self._activation: Callable[[torch.Tensor], torch.Tensor] = (
            model.activation_fn or torch.nn.Identity()
        )
        return model

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.model(features)["scores"]
        if logits.ndim > 1:
            logits = logits[:, 0]
        logits = logits.float()
        # Both columns of RERANK_COLUMNS: the raw logit and the model's own activation.
        return torch.stack([logits, self._activation(logits)], dim=1)
