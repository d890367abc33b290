"""The narrow interfaces between the server and a model, split where the process splits.

A served model has two halves that live in different processes:

- its :class:`Tokenizer` runs in the server process (and in tokenizer worker
  processes): text in, token ids out, cut to the model's length;
- its :class:`Model` runs in the engine process (``engine/worker.py``), alone with
  the device: token ids in, one float32 row per item out.

A *backend plugin* is a module with two functions, ``load_models(settings, options)``
(called in the engine process) and ``open_tokenizer(info, options)`` (called where
texts are tokenized). ``backends.loader`` is the real one, over sentence-transformers;
the tests have deterministic fakes with the same shape. Nothing above this layer
imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int32]
TokenIds = IdArray | Sequence[int]
FloatArray = npt.NDArray[np.float32]
Task = Literal["embeddings", "rerank"]

# A rerank model's row: the raw logit and the model's own activation of it (the sigmoid
# for one label, as CrossEncoder.predict applies), so the server needs no torch to pick.
RERANK_COLUMNS = ("logit", "score")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized item: the ids the model will see and whether they were cut."""

    ids: IdArray
    truncated: bool = False
    original_length: int = 0

    @classmethod
    def of(cls, ids: TokenIds, truncated: bool = False, original_length: int = 0) -> Encoded:
        array = np.asarray(ids, dtype=np.int32)
        return cls(array, truncated, original_length or len(array))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: Task
    max_length: int
    dimension: int | None = None  # embeddings only
    vocab_size: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    precision_reason: str = ""
    tokenizer_dir: str = ""  # where the engine saved the tokenizer, for open_tokenizer
    cuda_graphs: int = 0  # batch shapes whose forward pass replays a captured CUDA graph

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plugin:
    """A backend plugin (a module with ``load_models`` and ``open_tokenizer``) and its options."""

    module: str = "fake_openai_server.backends.loader"
    options: dict[str, Any] | None = None


class Pending(Protocol):
    def result(self) -> FloatArray:
        """Wait for the launched batch (releasing the GIL) and return its rows."""
        ...


class Model(Protocol):
    """The model half, in the engine process."""

    info: ModelInfo

    def launch(self, batch: Sequence[IdArray]) -> Pending:
        """Start one forward pass; on a GPU it returns before the pass has finished.

        Embeddings: rows of ``info.dimension`` floats. Rerank: rows of
        ``RERANK_COLUMNS``.
        """
        ...

    def export_tokenizer(self, folder: str) -> None:
        """Save what ``open_tokenizer`` needs to tokenize exactly as this model does."""
        ...


class Tokenizer(Protocol):
    """The tokenizer half, wherever texts are tokenized. Safe to call from several threads."""

    kind: str  # how it tokenizes, for the log and /info (fast path or why not)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize and cut each text to the model's maximum length, special tokens included."""
        ...

    def encode_pairs(self, query: str, documents: Sequence[str]) -> list[Encoded]:
        """Tokenize (query, document) pairs as the cross-encoder expects, cut to length."""
        ...

    def wrap_ids(self, ids: Sequence[int]) -> Encoded:
        """Add the special tokens around raw token ids and cut to length."""
        ...


class Done:
    """A pending result that is already there (CPU passes, fakes)."""

    def __init__(self, rows: FloatArray) -> None:
        self._rows = rows

    def result(self) -> FloatArray:
        return self._rows
