"""The server's side of the engine process (``engine/worker.py``): start it, send it
batches, collect their rows (``workers.py`` does the process plumbing)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fake_openai_server import wire
from fake_openai_server.backends.base import FloatArray, IdArray, ModelInfo, Plugin
from fake_openai_server.engine.worker import PassCost
from fake_openai_server.settings import Settings
from fake_openai_server.workers import WorkerProcess


@dataclass(frozen=True)
class Ran:
    """A batch's forward pass, done."""

    rows: FloatArray
    seconds: float  # device time
    graph: bool  # it replayed a CUDA graph captured at start-up


@dataclass(frozen=True)
class Loaded:
    models: list[ModelInfo]
    costs: list[PassCost]
    pid: int


class EngineProcess(WorkerProcess):
    module = "fake_openai_server.engine.worker"

    def __init__(self, settings: Settings, plugin: Plugin, workdir: str) -> None:
        super().__init__(
            {
                # The engine has no use for the keys (it inherits the server's
                # environment all the same).
                "settings": settings.model_dump(mode="json", exclude={"api_keys", "api_keys_file"}),
                "plugin": plugin.module,
                "options": plugin.options or {},
                "workdir": workdir,
            }
        )

    async def load(self) -> Loaded:
        """Start the process and wait until its models are loaded and warm."""
        ready = await self.start()
        return Loaded(
            models=[ModelInfo.from_dict(info) for info in ready["models"]],
            costs=[PassCost(**cost) for cost in ready["costs"]],
            pid=int(ready["pid"]),
        )

    def run(self, target: int, rows: Sequence[IdArray]) -> asyncio.Future[Ran]:
        """Send one batch for model ``target``."""
        return self.call(lambda call_id: wire.pack_sequences(call_id, target, rows))

    def decode(self, kind: int, body: bytes) -> tuple[int, Any]:
        call_id, out, seconds, graph = wire.unpack_done(body)
        return call_id, Ran(out, seconds, graph)
