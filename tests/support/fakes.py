"""Deterministic fake backends: drive the whole API fast, with no torch.

Vectors and scores are simple functions of the token ids, so tests can compute
the expected answer independently of the server.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from fake_openai_server.backends.base import Encoded, FloatArray, ModelInfo, TokenIds
from fake_openai_server.service.runtime import BackendLoader, Backends
from fake_openai_server.settings import Settings

BOS, EOS, SEP = 1, 2, 3
DIM = 8
MAX_LENGTH = 32
VOCAB = 1000


def char_ids(text: str) -> list[int]:
    return [ord(c) % (VOCAB - 10) + 10 for c in text]


def fake_vector(ids: Sequence[int]) -> FloatArray:
    """The fake model's embedding of ``ids`` (special tokens included)."""
    k = np.arange(1, DIM + 1, dtype=np.float64)
    total = sum(np.sin(i * k * 0.01) for i in ids)
    return np.asarray(total / len(ids) + 0.001 * k, dtype=np.float32)


def fake_text_vector(text: str) -> FloatArray:
    ids = [BOS, *char_ids(text)][: MAX_LENGTH - 1] + [EOS]
    return fake_vector(ids)


def fake_logit(query: str, document: str) -> float:
    """Shared distinct characters, centred: documents sharing more with the query rank higher."""
    return float(len(set(query) & set(document)) - 2)


class FakeTokenizer:
    """The part of a Hugging Face tokenizer that /tokenize and /decode use
    (``backends/vocabulary.py``), over the fake model's character ids."""

    is_fast = False
    all_special_ids = (BOS, EOS, SEP)

    def __init__(self) -> None:
        self._pieces = {BOS: "<s>", EOS: "</s>", SEP: "<sep>"}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return VOCAB

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = char_ids(text)
        with self._lock:
            self._pieces.update(zip(ids, text, strict=True))
        return {"input_ids": [BOS, *ids, EOS] if add_special_tokens else ids}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._pieces.get(i, "[UNK]") for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.all_special_ids)]
        return "".join(self._pieces.get(i, "?") for i in kept)


class FakeEmbeddingBackend:
    def __init__(self, name: str, delay: float = 0.0, dimension: int = DIM) -> None:
        self.info = ModelInfo(
            name=name, max_length=MAX_LENGTH, dimension=dimension, vocab_size=VOCAB
        )
        self.model = SimpleNamespace(tokenizer=FakeTokenizer())  # as SentenceTransformer has
        self.delay = delay
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> list[Encoded]:
        return [self.wrap_ids(char_ids(text)) for text in texts]

    def wrap_ids(self, ids: TokenIds) -> Encoded:
        full = [BOS, *ids, EOS]
        if len(full) <= MAX_LENGTH:
            return Encoded(full, False, len(full))
        return Encoded(full[: MAX_LENGTH - 1] + [EOS], True, len(full))

    def embed(self, batch: Sequence[TokenIds]) -> FloatArray:
        with self._lock:
            self.batches.append(len(batch))
        if self.delay:
            time.sleep(self.delay)
        return np.stack([fake_vector(ids) for ids in batch])


class FakeRerankBackend:
    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.info = ModelInfo(name=name, max_length=4 * MAX_LENGTH, vocab_size=VOCAB)
        self.delay = delay
        self.batches: list[int] = []
        self._pairs: dict[tuple[int, ...], float] = {}
        self._lock = threading.Lock()

    def tokenize_pairs(self, query: str, documents: Sequence[str]) -> list[Encoded]:
        out = []
        for doc in documents:
            ids = [BOS, *char_ids(query)[:MAX_LENGTH], SEP, *char_ids(doc)[:MAX_LENGTH], EOS]
            with self._lock:
                self._pairs[tuple(ids)] = fake_logit(query[:MAX_LENGTH], doc[:MAX_LENGTH])
            out.append(Encoded(ids, False, len(ids)))
        return out

    def score(self, batch: Sequence[TokenIds]) -> FloatArray:
        with self._lock:
            self.batches.append(len(batch))
            logits = [self._pairs[tuple(ids)] for ids in batch]
        if self.delay:
            time.sleep(self.delay)
        return np.asarray(logits, dtype=np.float32)

    def activate(self, logits: FloatArray) -> FloatArray:
        return np.asarray([1 / (1 + math.exp(-x)) for x in logits], dtype=np.float32)


def fake_loader(delay: float = 0.0) -> BackendLoader:
    """A loader that serves fakes under the configured model names."""

    def load(settings: Settings) -> Backends:
        backends = Backends()
        if settings.serves_embeddings:
            backends.embeddings = {
                name: FakeEmbeddingBackend(name, delay) for name in settings.embeddings_model
            }
        if settings.serves_rerank:
            name = settings.reranker_model
            backends.rerank = {name: FakeRerankBackend(name, delay)}
        return backends

    return load
