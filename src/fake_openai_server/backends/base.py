"""The narrow interfaces between the server and a model, split where the process splits.

A served model has two halves that live in different processes:

- its :class:`Tokenizer` runs in the server process (and in tokenizer worker
  processes): text in, token ids out, cut to the model's length;
- its :class:`Model` runs in the engine process (``engine/worker.py``), alone with
  the device: token ids in, one float32 row per item out.

A *backend plugin* is a module with two functions, ``load_models(settings, options)``
(called in the engine process) and ``open_tokenizer(info, options)`` (called where
texts are tokenized), and optionally ``prepare_tokenizers()`` (imports run while the
engine loads); a model may also have ``warm_shapes`` and ``capture`` (the shapes it pads
to on a GPU, and their CUDA graphs: ``engine/worker.calibrate``).
``backends.loader`` is the real one, over sentence-transformers;
the tests have deterministic fakes with the same shape. Nothing above this layer
imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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


class LoadError(Exception):
    """A model that cannot be loaded, for a reason its message says in full (the server
    reports the message alone, without the exception's type)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized item: the ids the model will see and whether they were cut.

    ``original_length``: the item's tokens before the cut (of the characters read).
    ``char_limit``: where the tokenizer read only the text's first characters (it caps
    the characters it reads of one text, to bound its work), that cap; 0 where it read
    the whole text. Such an item is ``truncated`` too, whether or not its tokens filled
    the model's length: the rest of the text is not in it.
    """

    ids: IdArray
    truncated: bool = False
    original_length: int = 0
    char_limit: int = 0

    @classmethod
    def of(
        cls, ids: TokenIds, truncated: bool = False, original_length: int = 0, char_limit: int = 0
    ) -> Encoded:
        array = np.asarray(ids, dtype=np.int32)
        return cls(array, truncated or bool(char_limit), original_length or len(array), char_limit)

    def cut_at(self, char_limit: int) -> Encoded:
        """This item, marked as the tokenization of a text's first ``char_limit``
        characters only."""
        return Encoded(self.ids, True, self.original_length, char_limit)


@dataclass(frozen=True)
class Padding:
    """The shape a model pads a batch to before its forward pass.

    On a GPU a batch's rows go up to the next of ``rows`` and its length up to a
    multiple of ``step`` (of ``long_step`` beyond ``long_from`` tokens), so that few
    shapes exist and each, up to ``long_from`` tokens, is warmed up (and captured as a
    CUDA graph) at start-up. The default pads nothing beyond the batch's longest item (a
    CPU, where a padded token costs as much as a real one). The engine forms batches
    whose padded shape stays within MAX_BATCH_TOKENS, so that every batch up to
    ``long_from`` tokens takes a shape that was warmed (a longer one is warmed the first
    time a batch takes it).
    """

    rows: tuple[int, ...] = ()
    step: int = 1
    long_step: int = 1
    long_from: int = 0  # lengths beyond this step by long_step (0: none do)
    max_length: int = 0  # no rounding beyond the model's maximum (0: none)

    def shape(self, rows: int, longest: int) -> tuple[int, int]:
        """The (rows, length) a batch of ``rows`` items, the longest ``longest``, runs as."""
        padded_rows = next((choice for choice in self.rows if choice >= rows), rows)
        step = self.long_step if self.long_from and longest > self.long_from else self.step
        length = -(-longest // step) * step
        if self.max_length:
            length = min(length, max(self.max_length, longest))
        return padded_rows, length

    def shapes(self, max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
        """Every shape a batch of at most ``max_rows`` items and ``long_from`` tokens
        can take within ``max_tokens`` padded tokens, largest first; none when nothing
        is padded (every batch is a shape of its own)."""
        if not self.rows or not self.long_from:
            return []
        top = min(self.max_length or self.long_from, self.long_from)
        # The grid's counts below the largest batch, and the count that batch runs as
        # (beyond the grid, counts are not rounded: only the largest is warmed).
        row_counts = {r for r in self.rows if r < max_rows} | {self.shape(max_rows, 1)[0]}
        found = {
            self.shape(rows, min(length, top))
            for rows in row_counts
            for length in range(self.step, top + self.step, self.step)
        }
        fitting = [(r, n) for r, n in found if r * n <= max_tokens]
        return sorted(fitting, key=lambda shape: shape[0] * shape[1], reverse=True)


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
    cpu_threads: int = 0  # torch's threads, where the model runs on the CPU
    padding: Padding = field(default_factory=Padding)
    revision: str | None = None  # the Hub commit its files are from (None: a local folder)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, info: dict[str, Any]) -> ModelInfo:
        """What ``as_dict`` gave (another process's, over JSON), as a ModelInfo again."""
        padding = info.get("padding") or {}
        rows = tuple(padding.get("rows", ()))
        return cls(**{**info, "padding": Padding(**{**padding, "rows": rows})})


@dataclass(frozen=True)
class Plugin:
    """A backend plugin (a module with ``load_models`` and ``open_tokenizer``) and its options."""

    module: str = "fake_openai_server.backends.loader"
    options: dict[str, Any] | None = None


class Pending(Protocol):
    """A launched pass. It may also say ``graph = True`` when it replays a CUDA graph
    (counted in the engine's stats; a pending result without it counts as eager)."""

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

    def encode_pairs(
        self, query: str, documents: Sequence[str], document_tokens: int | None = None
    ) -> list[Encoded]:
        """Tokenize (query, document) pairs as the cross-encoder expects, cut to length.

        ``document_tokens`` (Cohere's ``max_tokens_per_doc``): each document is first cut
        to its first that many tokens, as if it had been sent that short."""
        ...

    def wrap_ids(self, ids: Sequence[int]) -> Encoded:
        """Add the special tokens around raw token ids and cut to length."""
        ...


class Done:
    """A pending result that is already there (CPU passes, fakes)."""

    def __init__(self, rows: FloatArray, graph: bool = False) -> None:
        self._rows = rows
        self.graph = graph

    def result(self) -> FloatArray:
        return self._rows
