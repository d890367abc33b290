"""What the benchmark sends: models, texts and how much of each per shape and device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from fake_openai_server.backends.base import Padding
from tests.support import standins

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

    corpus: int  # distinct texts (100/300/500 chars): the ceilings and scenario 2
    sequential: int  # scenario 1 requests (300-character texts)
    clients: int  # scenario 2: concurrent clients, one text per request, over the corpus
    many_clients: int  # scenario 2-256: as many clients...
    many_requests: int  # ...sending this many requests (the corpus, cycled)
    uniform_clients: int  # scenario 2u: clients sending 300-character texts...
    uniform_requests: int  # ...this many
    bulk: int  # scenario 3: texts per request (the corpus, cycled)
    bulk_repeats: int  # scenario 3 requests, one after another
    health_clients: int  # scenario 0: GET /health from this many clients...
    health_requests: int  # ...this many times (the HTTP floor with this client)
    documents: int  # scenario 4: documents per rerank request
    rerank_pairs: int  # query-document pairs for the rerank ceilings (the first ``documents``
    # are the requests' documents)
    rerank_sequential: int  # scenario 4 requests, one client
    rerank_clients: int
    rerank_concurrent: int  # scenario 4 requests over the concurrent clients
    batch_sizes_float32: tuple[int, ...]  # encode / predict at float32
    batch_sizes: tuple[int, ...]  # encode / predict at the server's precision
    model_alone_batch_sizes: tuple[int, ...]  # the model alone, at the server's precision
    tokenizer_texts: int
    matmul_n: int


PLANS: dict[str, Plan] = {
    "tiny": Plan(
        corpus=12,
        sequential=3,
        clients=32,
        many_clients=256,
        many_requests=24,
        uniform_clients=32,
        uniform_requests=12,
        bulk=12,
        bulk_repeats=1,
        health_clients=8,
        health_requests=40,
        documents=6,
        rerank_pairs=6,
        rerank_sequential=2,
        rerank_clients=16,
        rerank_concurrent=8,
        batch_sizes_float32=(8,),
        batch_sizes=(8,),
        model_alone_batch_sizes=(8,),
        tokenizer_texts=32,
        matmul_n=512,
    ),
    "small": Plan(
        corpus=192,
        sequential=40,
        clients=32,
        many_clients=256,
        many_requests=512,
        uniform_clients=32,
        uniform_requests=192,
        bulk=512,
        bulk_repeats=1,
        health_clients=64,
        health_requests=2000,
        documents=32,
        rerank_pairs=32,
        rerank_sequential=8,
        rerank_clients=16,
        rerank_concurrent=32,
        batch_sizes_float32=(8, 16, 32),
        batch_sizes=(8, 16, 32),
        model_alone_batch_sizes=(8, 16, 32),
        tokenizer_texts=512,
        matmul_n=2048,
    ),
    # About 1 text/s in float32 on 2 CPU cores: scenario 2 gets 48 texts, the
    # float32 ceiling two batch sizes, rerank fewer requests.
    "full": Plan(
        corpus=48,
        sequential=12,
        clients=32,
        many_clients=256,
        many_requests=256,
        uniform_clients=32,
        uniform_requests=48,
        bulk=256,
        bulk_repeats=1,
        health_clients=64,
        health_requests=2000,
        documents=32,
        rerank_pairs=32,
        rerank_sequential=2,
        rerank_clients=16,
        rerank_concurrent=16,
        batch_sizes_float32=(8, 16),
        batch_sizes=(8, 16, 32),
        model_alone_batch_sizes=(8, 16),
        tokenizer_texts=512,
        matmul_n=2048,
    ),
    # The model costs next to nothing: what HTTP, tokenization and batching cost (the
    # server's own ceiling). The scenarios issue 9's CPU targets name: 64 clients x one
    # 300-character text (2u), requests of 512 texts (3), one client p50 (1), rerank 16
    # clients x 32 documents (4).
    "null": Plan(
        corpus=768,
        sequential=500,
        clients=32,
        many_clients=256,
        many_requests=3072,
        uniform_clients=64,
        uniform_requests=4096,
        bulk=512,
        bulk_repeats=8,
        health_clients=64,
        health_requests=4000,
        documents=32,
        rerank_pairs=512,
        rerank_sequential=50,
        rerank_clients=16,
        rerank_concurrent=200,
        batch_sizes_float32=(32, 64),
        batch_sizes=(32, 64),
        model_alone_batch_sizes=(32, 64, 128, 256),
        tokenizer_texts=512,
        matmul_n=2048,
    ),
}


def plan_for(shape: str, device: str) -> Plan:
    plan = PLANS[shape]
    if device != "cuda" or shape in ("tiny", "null"):
        return plan
    # A GPU embeds hundreds to thousands of texts a second: more work, bigger batches.
    # Sized so that one full-shape run takes about 2.5 minutes on an H100 with today's
    # server (two runs, before and after, fit in one 10-minute call with the stand-ins).
    return replace(
        plan,
        corpus=1024,
        sequential=100,
        many_requests=3072,
        uniform_requests=1024,
        bulk=512,
        bulk_repeats=8,
        documents=32,
        rerank_pairs=512,
        rerank_sequential=20,
        rerank_concurrent=128,
        batch_sizes_float32=(128,),
        batch_sizes=(32, 64, 128),
        model_alone_batch_sizes=(32, 64, 128, 256),
        matmul_n=8192,
    )


# --- the lent H200's timing, on any machine ---------------------------------------
@dataclass(frozen=True)
class EmulatedGPU:
    """The GPU host's timing for ``bench.ab --emulate-gpu``: the server runs over the fake
    models (``tests/support/fakes.py``), whose tokenizers and forward passes take that
    host's time by sleeping, so the server's own hand-offs (HTTP, tokenizer processes,
    chunks, queue, engine process, two passes in flight) run for real at that host's pace
    on a machine of two cores.

    From ``bench/results/full-cuda-final.md`` (H200, ruri-large shape, float16): the model
    alone does 1,795 texts/s in batches of 32 and 1,972 in batches of 128 (texts of ~300
    tokens), i.e. a pass takes ~2.1 ms plus ~1.6 µs per token of its padded shape; the
    tokenizer, 825 texts/s on one core, ~1.2 ms per text; 8 tokenizer processes, as there
    by default. The fake models pad batches to the shapes the real backend uses on CUDA
    and take one token per character up to ruri-large's 512, so the corpus's texts have
    its lengths (100/300/500 characters: ~100/300/500 tokens) and batches form and pad
    as they do there, within the default ``MAX_BATCH_TOKENS``; their vectors have
    ruri-large's 1,024 dimensions, so replies are as large as there and cost the serving
    process as much to write (a one-text reply in floats: ~10 KB). Not emulated: the CPU that
    tokenizing and the engine use there (here they sleep), and that host's slower Python.
    """

    pass_ms: float = 2.1
    token_ms: float = 0.001635
    tokenize_ms_per_text: float = 1.2
    max_length: int = 512
    dimension: int = 1024
    tokenizer_workers: int = 8

    def fakes(self) -> dict[str, object]:
        from fake_openai_server.backends import sentence_transformers as st

        padding = Padding(
            st.BATCH_SIZES, st.LENGTH_STEP, st.LONG_STEP, st.WARM_LENGTH, self.max_length
        )
        return {
            "gpu": [self.pass_ms, self.token_ms],
            "tokenizer_ms_per_text": self.tokenize_ms_per_text,
            "max_length": self.max_length,
            "dimension": self.dimension,
            "padding": asdict(padding),
        }

    def settings(self) -> dict[str, str]:
        return {"TOKENIZER_WORKERS": str(self.tokenizer_workers)}

    @property
    def device_alone(self) -> float:
        """Texts/s of the emulated model alone: batches of 128 corpus texts (302 tokens on
        average with the fake tokenizer's two special tokens), each padded to its longest
        (length-sorted, as ``bench.run``'s model alone)."""
        return 1000 * 128 / (self.pass_ms + self.token_ms * 128 * 302)


EMULATED_H200 = EmulatedGPU()


def corpus_texts(n: int, seed: int = 1000) -> list[str]:
    return [standins.japanese_text(LENGTHS[i % len(LENGTHS)], seed + i) for i in range(n)]


def texts_300(n: int, seed: int) -> list[str]:
    return [standins.japanese_text(300, seed + i) for i in range(n)]


def cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def single_texts(plan: Plan) -> list[str]:
    """Scenario 1's texts (300 characters each), also the in-process one-text ceiling's."""
    return texts_300(plan.sequential, seed=5000)


def embedding_texts(plan: Plan, wanted: set[str]) -> dict[str, list[str]]:
    """Each embeddings scenario's texts, for the scenarios wanted ("1", "2", "3", "5"):
    one request per text for 1, 2, 2-256, 2u and 5; all of them in each request of 3 and
    of 5's bulk job ("5-bulk").

    1 and 2u are 300-character texts; 2, 2-256, 3 and 5 the mixed corpus, cycled.
    """
    corpus = corpus_texts(plan.corpus)
    texts: dict[str, list[str]] = {}
    if "1" in wanted:
        texts["1"] = single_texts(plan)
    if "2" in wanted:
        texts["2"] = corpus
        texts["2-256"] = cycle(corpus, plan.many_requests)
        texts["2u"] = texts_300(plan.uniform_requests, seed=3000)
    if "3" in wanted:
        texts["3"] = cycle(corpus, plan.bulk)
    if "5" in wanted:  # the corpus one text at a time, beside requests of scenario 3's texts
        texts["5"] = corpus
        texts["5-bulk"] = cycle(corpus, plan.bulk)
    return texts
