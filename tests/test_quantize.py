"""Quantized embeddings (``service/quantize.py``): each form against values worked out
by hand, and the calibration's life cycle."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.service.quantize import (
    Calibration,
    Calibrations,
    Scale,
    calibrate,
    quantize,
)

VECTORS = np.float32([[1.27, -1.28, 0.004, 2.0, -0.006, 0.0, 0.5, -0.5, 0.1, -0.1]])
SCALE = Scale(max_abs=1.27, texts=3, dimension=10)  # step 0.01


def test_binary_and_ubinary_pack_the_signs_most_significant_bit_first() -> None:
    # signs: + - + + - 0 + - | + -  →  bits 1011 0010 | 10(000000)
    assert quantize(VECTORS, "ubinary").tolist() == [[0b10110010, 0b10000000]]
    assert quantize(VECTORS, "binary").tolist() == [[0b10110010 - 128, 0b10000000 - 128]]
    assert quantize(VECTORS, "ubinary").dtype == np.uint8
    assert quantize(VECTORS, "binary").dtype == np.int8


def test_int8_is_the_value_over_one_step_rounded_and_clipped() -> None:
    assert SCALE.step == pytest.approx(0.01)
    int8 = quantize(VECTORS, "int8", SCALE)
    assert int8.dtype == np.int8
    assert int8.tolist() == [[127, -128, 0, 127, -1, 0, 50, -50, 10, -10]]
    uint8 = quantize(VECTORS, "uint8", SCALE)
    assert uint8.dtype == np.uint8
    assert uint8.tolist() == [[255, 0, 128, 255, 127, 128, 178, 78, 138, 118]]


def test_int8_keeps_the_direction_of_each_vector() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 64)).astype(np.float32)
    scale = Scale(float(np.abs(vectors).max()), 50, 64)
    back = quantize(vectors, "int8", scale).astype(np.float32) * scale.step
    cosine = (
        (back * vectors).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(vectors, axis=1)
    )
    assert cosine.min() > 0.999


def test_float_is_unchanged_and_unknown_types_are_refused() -> None:
    assert quantize(VECTORS, "float") is VECTORS
    with pytest.raises(ValueError, match="needs a calibrated step"):
        quantize(VECTORS, "int8")
    with pytest.raises(ValueError, match="unknown"):
        quantize(VECTORS, "int4", SCALE)


def test_calibrate_takes_the_largest_absolute_value() -> None:
    async def embed(texts: Sequence[str]) -> np.ndarray:
        return np.float32([[len(t), -2 * len(t)] for t in texts])

    calibration = asyncio.run(calibrate(embed, ["a", "abc"]))
    scale = calibration.scale(2, normalized=False)
    assert (scale.max_abs, scale.texts, scale.dimension) == (6.0, 2, 2)
    assert scale.step == pytest.approx(6 / 127)


def test_each_cut_and_normalisation_has_its_own_scale() -> None:
    """Cut to d of D dimensions and normalised again, values grow about sqrt(D/d): with
    the full-length scale int8 clipped them (recall@10 0.95 at 256 of 1,024)."""
    rng = np.random.default_rng(1)
    weights = np.linspace(2.0, 0.5, 1024, dtype=np.float32)  # earlier dimensions larger
    corpus = rng.normal(size=(152, 1024)).astype(np.float32) * weights
    vectors = rng.normal(size=(500, 1024)).astype(np.float32) * weights
    calibration = Calibration(corpus)
    assert calibration.scale(2048, False).dimension == 1024  # no longer than the model's
    unit = vectors[:, :256] / np.linalg.norm(vectors[:, :256], axis=1, keepdims=True)

    def clipped(scale: Scale) -> float:
        levels = np.abs(np.rint(unit / np.float32(scale.step)))
        return float((levels > 127).mean())

    full = Scale(
        float(np.abs(corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).max()), 152, 1024
    )
    own = calibration.scale(256, normalized=True)
    assert clipped(full) > 0.002  # what one full-length scale did
    assert clipped(own) < clipped(full) / 10
    expected = np.abs(corpus[:, :256] / np.linalg.norm(corpus[:, :256], axis=1, keepdims=True))
    assert own.max_abs == pytest.approx(float(expected.max()), rel=1e-6)
    assert calibration.scale(256, normalized=True) is own  # worked out once
    raw = calibration.scale(256, normalized=False)
    assert raw.max_abs == pytest.approx(float(np.abs(corpus[:, :256]).max()))


def test_calibration_runs_once_for_all_waiters_and_again_after_a_failure() -> None:
    calls: list[int] = []

    async def embed(texts: Sequence[str]) -> np.ndarray:
        calls.append(len(texts))
        await asyncio.sleep(0.01)
        if len(calls) == 1:
            raise RuntimeError("a failed batch")
        return np.float32([[1.0, -3.0]] * len(texts))

    async def main() -> None:
        calibrations = Calibrations(["x", "y"])
        calibrations.attach({"m": embed}, start=False)
        assert calls == [] and calibrations.state("m") == "not started"
        with pytest.raises(ServiceError) as failed:
            await asyncio.gather(calibrations.calibration("m"), calibrations.calibration("m"))
        assert failed.value.kind is ErrorKind.MODEL_FAILURE
        assert "RuntimeError" not in failed.value.message
        found = await asyncio.gather(*(calibrations.calibration("m") for _ in range(5)))
        assert calls == [2, 2]  # one failed run, then one run for all five
        assert {c.scale(2, normalized=False).max_abs for c in found} == {3.0}
        assert calibrations.state("m") == "ready"
        assert calibrations.published()["models"]["m"]["step"] == pytest.approx(3 / 127)
        cut = calibrations.published(dimensions=1, normalized=True)["models"]["m"]
        assert (cut["dimension"], cut["normalized"], cut["max_abs"]) == (1, True, 1.0)
        with pytest.raises(ServiceError) as unknown:
            await calibrations.calibration("other")
        assert unknown.value.kind is ErrorKind.NOT_READY
        await calibrations.stop()

    asyncio.run(main())


def test_attach_with_start_calibrates_at_once() -> None:
    async def embed(texts: Sequence[str]) -> np.ndarray:
        return np.float32([[0.5]] * len(texts))

    async def main() -> None:
        calibrations = Calibrations(["x"])
        calibrations.attach({"m": embed}, start=True)
        assert calibrations.state("m") == "running"
        await asyncio.sleep(0.01)
        assert calibrations.state("m") == "ready"
        assert calibrations.summary()["models"] == {"m": "ready"}

    asyncio.run(main())
