"""Tokenizers alone: the slow Hugging Face path against fast_tokenizers, 1 and 2 threads.

    TOKENIZERS_PARALLELISM=false uv run python -m bench.tokenizers

Texts are 300-character Japanese chunks (``standins.japanese_text``), in calls of
``--batch`` texts (embeddings) or one query and ``--documents`` documents (rerank). With two
threads each runs half of the calls, on its own copy of the slow tokenizer (as the server
gives each worker thread one) or on one shared fast encoder; the gain over one thread shows
how much of the work runs outside the GIL. Without ``TOKENIZERS_PARALLELISM=false`` the Rust
library may spread one call over several cores, which hides that.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import Meter
from fake_openai_server.backends.fast_tokenizers import fast_encoder
from tests.support import standins

Work = Callable[[Any, int], None]
_OTHER_LOAD: list[float] = []  # cores used by other processes during each measurement


def _rate(make: Callable[[], Any], work: Work, calls: int, threads: int) -> float:
    """Calls per second: ``calls`` calls of ``work(state, i)`` spread over ``threads``.

    Other processes' CPU use during the run goes to ``_OTHER_LOAD``."""
    states = [make() for _ in range(threads)]
    for state in states:
        work(state, 0)  # warm up: MeCab taggers, caches

    def run(state: Any, first: int) -> None:
        for i in range(first, calls, threads):
            work(state, i)

    workers = [threading.Thread(target=run, args=(s, n)) for n, s in enumerate(states)]
    meter = Meter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    used = meter.stop()
    _OTHER_LOAD.append(used["other_load_cores"] + used["stolen_cores"])
    return calls / float(used["wall_s"])


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _embeddings(tokenizer: Any, calls: list[list[str]]) -> None:
    encoder, kind = fast_encoder(tokenizer)
    assert encoder is not None, kind
    per_call = sum(map(len, calls)) / len(calls)
    for threads in (1, 2):
        slow = _rate(
            lambda: copy.deepcopy(tokenizer),
            lambda tok, i: tok(calls[i])["input_ids"],
            len(calls),
            threads,
        )
        fast = _rate(lambda: encoder, lambda enc, i: enc.encode(calls[i]), len(calls), threads)
        print(
            f"  {per_call:3.0f} texts/call, {threads} thread(s): "
            f"transformers {slow * per_call:7,.0f}  fast {fast * per_call:7,.0f} texts/s"
        )


def _rerank(tokenizer: Any, queries: list[str], documents: list[list[str]]) -> None:
    encoder, kind = fast_encoder(tokenizer)
    assert encoder is not None, kind
    n = len(documents[0])
    for threads in (1, 2):
        slow = _rate(
            lambda: copy.deepcopy(tokenizer),
            lambda tok, i: tok(
                [queries[i]] * n, documents[i], truncation="longest_first", max_length=512
            )["input_ids"],
            len(queries),
            threads,
        )
        fast = _rate(
            lambda: encoder,
            lambda enc, i: enc.encode_pairs(queries[i], documents[i], 512),
            len(queries),
            threads,
        )
        print(
            f"  {threads} thread(s): transformers {slow * n:7,.0f}  fast {fast * n:7,.0f} pairs/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=64, help="texts per call")
    parser.add_argument("--documents", type=int, default=32, help="documents per rerank call")
    args = parser.parse_args()
    texts = [standins.japanese_text(300, seed=i) for i in range(args.texts)]
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    singles = [[text] for text in texts[:1024]]
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, words in (("words", True), ("characters only", False)):
            folder = Path(tmp) / label
            standins.save_bert_japanese_tokenizer(folder, standins.ruri_large_vocab("full", words))
            tokenizer = _tokenizer(folder)
            tokens = sum(len(tokenizer(text)["input_ids"]) for text in texts[:200]) / 200
            _, kind = fast_encoder(tokenizer)
            print(
                f"\nruri-large stand-in, vocabulary of {label} ({tokens:.0f} tokens/text); {kind}"
            )
            _embeddings(tokenizer, batches)
            _embeddings(tokenizer, singles)

        reranker = _tokenizer(standins.build_reranker(Path(tmp) / "hf", "tiny"))
        n = args.documents
        queries = [standins.japanese_text(50, seed=10_000 + i) for i in range(len(texts) // n)]
        documents = [texts[i * n : (i + 1) * n] for i in range(len(queries))]
        _, kind = fast_encoder(reranker)
        print(f"\nreranker stand-in, 50-character query x {n} documents of 300; {kind}")
        _rerank(reranker, queries, documents)
    print(f"\nother processes used {min(_OTHER_LOAD):.2f}..{max(_OTHER_LOAD):.2f} cores meanwhile")


if __name__ == "__main__":
    main()
