"""docs/operations.ja.md's metrics table is what /metrics exports: every series it lists
exists, one it names ``_total`` is a counter (``rate()`` and ``increase()`` over it are
sound), and every series of the server's own is listed."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_app import fake_app_process

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operations.ja.md"


def _listed_metrics() -> list[str]:
    """The names in the first column of the guide's metrics table (labels dropped;
    ``process_*``-style families skipped)."""
    section = GUIDE.read_text(encoding="utf-8").split("## メトリクス", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in re.findall(r"^\| (.+?) \| .+\|$", section, re.MULTILINE):
        names += re.findall(r"`([a-z_]+)(?:\{[a-z_,]*\})?`", row)
    return names


def test_every_metric_in_the_operations_guide_is_exported_as_its_kind() -> None:
    listed = _listed_metrics()
    assert "fos_engine_restarts_total" in listed and "fos_ready" in listed
    with (
        fake_app_process({"service_type": "all"}, delay=0.01) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        assert client.post("/v1/embeddings", json={"input": ["東京"]}).status_code == 200
        text = client.get("/metrics").text
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name in listed:
        if name.endswith("_total"):
            assert kinds.get(name.removesuffix("_total")) == "counter", name
        else:
            assert kinds.get(name) in ("gauge", "histogram"), name
    # Not listed one by one: each counter's and histogram's start time (``*_created``,
    # a series of its own in the text format), and the engine process's ``process_*``
    # series (the guide's ``fos_engine_process_*``).
    own = {
        name
        for name in kinds
        if name.startswith("fos_")
        and not name.endswith("_created")
        and not name.startswith("fos_engine_process_")
    }
    spelt = {f"{name}_total" if kinds[name] == "counter" else name for name in own}
    assert spelt <= set(listed), spelt - set(listed)
