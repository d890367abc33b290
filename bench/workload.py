"""What the benchmark sends: models, texts and how much of each per shape and device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fake_openai_server import standins

EMBED_MODEL = standins.RURI_LARGE
RERANK_MODEL = standins.RERANKER
LENGTHS = (100, 300, 500)
QUERY = "瑠璃色とはどのような色で、どこで見ることができますか？"
SCENARIOS = {"1": "sequential", "2": "concurrent", "3": "bulk", "4": "rerank"}
READY_TIMEOUT = 1800.0


# --- what runs ------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How much work each part does for one shape and device."""

    corpus: int  # distinct texts (100/300/500 chars) for the ceilings and scenario 2
    sequential: int  # scenario 1 requests (300-character texts)
    clients: int  # scenario 2 concurrent clients
    bulk: int  # scenario 3 texts in the one request
    bulk_repeats: int  # scenario 3 requests, one after another
    documents: int  # scenario 4 documents per rerank request
    rerank_sequential: int  # scenario 4 requests, one client
    rerank_clients: int
    rerank_concurrent: int  # scenario 4 requests over the concurrent clients
    batch_sizes_float32: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # at the server's precision
    tokenizer_texts: int
    matmul_n: int


PLANS: dict[str, Plan] = {
    "tiny": Plan(
        corpus=12,
        sequential=3,
        clients=32,
        bulk=12,
        bulk_repeats=1,
        documents=6,
        rerank_sequential=2,
        rerank_clients=8,
        rerank_concurrent=8,
        batch_sizes_float32=(8,),
        batch_sizes=(8,),
        tokenizer_texts=32,
        matmul_n=512,
    ),
    "small": Plan(
        corpus=192,
        sequential=40,
        clients=32,
        bulk=256,
        bulk_repeats=1,
        documents=32,
        rerank_sequential=8,
        rerank_clients=8,
        rerank_concurrent=24,
        batch_sizes_float32=(8, 16, 32),
        batch_sizes=(8, 16, 32),
        tokenizer_texts=512,
        matmul_n=2048,
    ),
    # About 1 text/s in float32 on 2 CPU cores: scenario 2 gets 48 texts, the
    # float32 ceiling two batch sizes, rerank fewer requests.
    "full": Plan(
        corpus=48,
        sequential=12,
        clients=32,
        bulk=256,
        bulk_repeats=1,
        documents=32,
        rerank_sequential=2,
        rerank_clients=8,
        rerank_concurrent=8,
        batch_sizes_float32=(8, 16),
        batch_sizes=(8, 16, 32),
        tokenizer_texts=512,
        matmul_n=2048,
    ),
}


def plan_for(shape: str, device: str) -> Plan:
    plan = PLANS[shape]
    if device != "cuda" or shape == "tiny":
        return plan
    # A GPU embeds hundreds of texts a second: more work, bigger batches.
    return replace(
        plan,
        corpus=1024,
        sequential=100,
        bulk_repeats=8,
        rerank_sequential=20,
        rerank_concurrent=64,
        batch_sizes_float32=(32, 64, 128),
        batch_sizes=(32, 64, 128),
        matmul_n=8192,
    )


def corpus_texts(n: int, seed: int = 1000) -> list[str]:
    return [standins.japanese_text(LENGTHS[i % len(LENGTHS)], seed + i) for i in range(n)]


def texts_300(n: int, seed: int) -> list[str]:
    return [standins.japanese_text(300, seed + i) for i in range(n)]


def cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]
