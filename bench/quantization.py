"""Recall@10 of quantized embeddings (int8, uint8, binary, ubinary) against float.

A retrieval set built from the stand-in model: Japanese documents and queries
(``standins.japanese_text``), embedded by a real server over HTTP (/v2/embed with every
``embedding_types`` at once), each form ranked the way a vector database ranks it:

- float: cosine similarity of the float vectors (the reference top 10);
- int8, uint8: cosine similarity of the integer vectors as they are stored;
- binary, ubinary: Hamming distance of the bit vectors.

recall@10 is the share of each query's float top 10 that the quantized form also puts
in its top 10. With random weights this measures how much ranking information each
form keeps, not retrieval quality.

    uv run python -m bench.quantization --size tiny    # seconds
    uv run python -m bench.quantization --size full    # ruri-large's shape, minutes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

TYPES = ("int8", "uint8", "binary", "ubinary")
K = 10


def retrieval_set(documents: int, queries: int) -> tuple[list[str], list[str]]:
    from tests.support.standins import japanese_text

    docs = [japanese_text(60 + (i * 37) % 240, seed=i) for i in range(documents)]
    asks = [japanese_text(15 + (j * 7) % 30, seed=100_000 + j) for j in range(queries)]
    return docs, asks


def embed(client: httpx.Client, texts: list[str], input_type: str) -> dict[str, Any]:
    """Every form of the vectors of ``texts`` from one pass of the model (Cohere v2's
    ``embedding_types`` asks for all of them at once)."""
    forms: dict[str, list[Any]] = {kind: [] for kind in ("float", *TYPES)}
    for start in range(0, len(texts), 64):
        reply = client.post(
            "/v2/embed",
            json={
                "texts": texts[start : start + 64],
                "input_type": input_type,
                "embedding_types": list(forms),
            },
        )
        reply.raise_for_status()
        for kind, rows in reply.json()["embeddings"].items():
            forms[kind] += rows
    return {
        kind: np.asarray(rows, dtype=np.float64 if kind == "float" else np.int64)
        for kind, rows in forms.items()
    }


def top_k(scores: npt.NDArray[np.float64], k: int = K) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]


def cosine(queries: Any, docs: Any) -> npt.NDArray[np.float64]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True).clip(1e-12)
    scores: npt.NDArray[np.float64] = q @ d.T
    return scores


def hamming_scores(queries: Any, docs: Any) -> npt.NDArray[np.float64]:
    """Minus the Hamming distance between packed bit vectors (int8 or uint8 bytes)."""
    q = np.unpackbits(queries.astype(np.uint8), axis=1).astype(np.int64)
    d = np.unpackbits(docs.astype(np.uint8), axis=1).astype(np.int64)
    distance = q.sum(1, keepdims=True) + d.sum(1) - 2 * (q @ d.T)
    scores: npt.NDArray[np.float64] = -distance.astype(np.float64)
    return scores


def recall_at_k(reference: list[set[int]], scores: npt.NDArray[np.float64]) -> float:
    found = top_k(scores)
    return float(np.mean([len(a & b) / K for a, b in zip(reference, found, strict=True)]))


def measure(base_url: str, documents: int = 1000, queries: int = 100) -> dict[str, float]:
    docs, asks = retrieval_set(documents, queries)
    with httpx.Client(base_url=base_url, timeout=600) as client:
        q, d = embed(client, asks, "search_query"), embed(client, docs, "search_document")
    reference = top_k(cosine(q["float"], d["float"]))
    recalls = {}
    for kind in TYPES:
        scores = hamming_scores(q[kind], d[kind]) if "binary" in kind else cosine(q[kind], d[kind])
        recalls[kind] = recall_at_k(reference, scores)
    return recalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="tiny")
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    hf_home = Path(tempfile.mkdtemp(prefix="fos-quant-"))
    os.environ.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})

    from fake_openai_server.api.app import create_embeddings_app
    from fake_openai_server.settings import Settings
    from tests.support import standins
    from tests.support.live import serve_app

    standins.build_ruri_large(hf_home, args.size)
    app = create_embeddings_app(Settings(dtype="float32"))
    with serve_app(app) as server:
        recalls = measure(server.base_url, args.documents, args.queries)
    print(
        f"recall@{K} against float, {args.documents} documents, {args.queries} queries "
        f"({args.size} stand-in of cl-nagoya/ruri-large):"
    )
    for kind, value in recalls.items():
        print(f"  {kind:8s} {value:.3f}")


if __name__ == "__main__":
    main()
