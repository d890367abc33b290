"""The narrow interface between the server and a model.

A backend tokenizes (thread-safe, called from worker threads) and runs one
batch of already-tokenized items (called from the single inference thread).
Nothing above this layer imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

TokenIds = Sequence[int]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Encoded:
    """One tokenized item: the ids the model will see and whether they were cut."""

    ids: list[int]
    truncated: bool = False
    original_length: int = 0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_length: int
    dimension: int | None = None  # embeddings only
    vocab_size: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    precision_reason: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class EmbeddingBackend(Protocol):
    info: ModelInfo

    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize and cut each text to ``info.max_length`` tokens, special tokens included."""
        ...

    def wrap_ids(self, ids: TokenIds) -> Encoded:
        """Add the special tokens around raw token ids and cut to length."""
        ...

    def embed(self, batch: Sequence[TokenIds]) -> FloatArray:
        """One forward pass: a float32 array of shape (len(batch), dimension)."""
        ...


class RerankBackend(Protocol):
    info: ModelInfo

    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> list[Encoded]:
        """Tokenize (query, document) pairs as the cross-encoder expects, cut to length."""
        ...

    def score(self, batch: Sequence[TokenIds]) -> FloatArray:
        """One forward pass: raw logits, float32, shape (len(batch),)."""
        ...

    def activate(self, logits: FloatArray) -> FloatArray:
        """The model's own activation (sigmoid for one label), as CrossEncoder.predict applies."""
        ...
