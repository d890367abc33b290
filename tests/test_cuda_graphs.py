"""CUDA graphs (CUDA_GRAPHS): a replayed pass gives the eager pass's rows.

Runs only where there is a CUDA device (the lent GPU machine; skipped elsewhere). The
stand-ins are the tiny ones of the other tests, loaded in float16 on the device twice:
once with graphs captured for a few shapes, once without; every batch goes through
both and the rows must agree within float16's rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fake_openai_server.backends.sentence_transformers import (  # noqa: E402
    CrossEncoderModel,
    SentenceTransformerModel,
    resolve_precision,
)
from tests.support.standins import RERANKER, RURI_LARGE  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float16 passes; the two paths may pick different attention kernels for the same input.
ATOL = 2e-3


def _load(cls: Any, name: str, graphs: bool) -> Any:
    model = cls(name, resolve_precision("cuda", "float16"), None, graphs)
    shapes = model.warm_shapes(16, 2048)
    for rows, length in shapes:  # the eager first pass of each shape, as calibrate does
        model.launch([np.full(length, 1, dtype=np.int32)] * rows).result()
    return model, shapes


def _batch(rng: np.random.Generator, rows: int, longest: int, vocab: int) -> list[np.ndarray]:
    lengths = rng.integers(1, longest + 1, size=rows)
    return [rng.integers(1, vocab, size=int(n), dtype=np.int32) for n in lengths]


@pytest.mark.parametrize(
    ("cls", "name"), [(SentenceTransformerModel, RURI_LARGE), (CrossEncoderModel, RERANKER)]
)
def test_replayed_rows_equal_eager_rows(hf_home: Path, cls: Any, name: str) -> None:
    graphs, shapes = _load(cls, name, graphs=True)
    eager, _ = _load(cls, name, graphs=False)
    assert graphs.capture(shapes) == len(shapes) == graphs.info.cuda_graphs > 0
    assert eager.capture(shapes) == 0 == eager.info.cuda_graphs

    rng = np.random.default_rng(7)
    for rows, longest in [(1, 5), (1, 200), (3, 64), (5, 300), (16, 128), (7, 512)]:
        batch = _batch(rng, rows, longest, graphs.vocab_size)
        launched, plain = graphs.launch(batch), eager.launch(batch)
        # A warmed shape replays its graph; 8 x 512 is beyond the 2,048 tokens warmed.
        shape = graphs.info.padding.shape(rows, max(len(ids) for ids in batch))
        assert launched.graph == (shape in shapes) and not plain.graph
        np.testing.assert_allclose(launched.result(), plain.result(), atol=ATOL, rtol=ATOL)
    assert (8, 512) not in shapes

    # Two batches of one shape in flight at once: each keeps its own rows.
    first, second = (_batch(rng, 4, 100, graphs.vocab_size) for _ in range(2))
    pending = [graphs.launch(first), graphs.launch(second)]
    for batch, launched in zip([first, second], pending, strict=True):
        np.testing.assert_allclose(
            launched.result(), eager.launch(batch).result(), atol=ATOL, rtol=ATOL
        )
