"""In-process measurements: the machine, CPU meters, FLOPs, the matmul and model ceilings."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


# --- the machine ------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict[str, Any]:
    import sentence_transformers
    import torch
    import transformers

    from fake_openai_server.backends.sentence_transformers import cpu_has_native_bfloat16

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bfloat16": cpu_has_native_bfloat16(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system, all threads) of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy() -> tuple[float, float]:
    """CPU seconds since boot, all cores: busy here, and stolen by the hypervisor."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Start a new VmHWM window (``echo 5 > clear_refs``); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Meter:
    """Wall time and CPU time of the benchmark, the server and everything else."""

    server_pid: int | None = None
    wall: float = field(default_factory=time.perf_counter)
    bench: float = field(default_factory=process_cpu)
    machine: tuple[float, float] = field(default_factory=machine_busy)
    server: float = 0.0

    def __post_init__(self) -> None:
        if self.server_pid is not None:
            self.server = process_cpu(self.server_pid)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        bench = process_cpu() - self.bench
        server = process_cpu(self.server_pid) - self.server if self.server_pid else 0.0
        busy, steal = machine_busy()
        other = max(0.0, busy - self.machine[0] - bench - server)
        out = {
            "wall_s": wall,
            "client_cpu_s": bench,
            "other_load_cores": other / wall,
            "stolen_cores": (steal - self.machine[1]) / wall,
        }
        if self.server_pid is not None:
            out["server_cpu_cores"] = server / wall
        return out


# --- FLOPs ---------------------------------------------------------------------------
def encoder_flops(config: Any, tokens: int) -> float:
    """Multiply-adds x 2 of one sequence through a BERT or ModernBERT encoder.

    Per layer and token: Q, K, V and output projections (4 h^2) and the MLP
    (2 h i for BERT, 3 h i for ModernBERT's gated MLP); per layer: scores and
    their product with V (2 L^2 h). Embedding lookups and the heads are left out.
    """
    h = int(config.hidden_size)
    inter = int(config.intermediate_size)
    mlp = 3 * h * inter if config.model_type == "modernbert" else 2 * h * inter
    per_layer = 2 * tokens * (4 * h * h + mlp) + 4 * tokens * tokens * h
    return float(config.num_hidden_layers * per_layer)


def matmul_gflops(dtype_name: str, device: str, n: int) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        warm = time.perf_counter()
        while time.perf_counter() - warm < 0.3:  # warm-up: thread pool, kernels, clocks
            a @ b
        sync()
        reps = 1
        while True:  # enough repetitions for about 0.2 s
            started = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            elapsed = time.perf_counter() - started
            if elapsed > 0.2 or reps >= 4096:
                break
            reps *= 2
        best = elapsed
        for _ in range(4):  # the best of five: a ceiling
            started = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = min(best, time.perf_counter() - started)
    return 2 * n**3 * reps / best / 1e9


# --- in-process ceilings ---------------------------------------------------------------
def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _model_kwargs(dtype_name: str) -> dict[str, Any]:
    import torch

    if dtype_name == "float32":
        return {}
    return {"model_kwargs": {"dtype": getattr(torch, dtype_name)}}


def _sweep(
    run: Callable[[int], Any], n: int, batch_sizes: Sequence[int]
) -> tuple[dict[str, Any], Any]:
    """Time ``run(batch_size)`` over ``n`` items for each batch size; keep the best."""
    by_size: dict[str, float] = {}
    best_out: Any = None
    meter = Meter()
    for size in batch_sizes:
        started = time.perf_counter()
        out = run(size)
        by_size[str(size)] = n / (time.perf_counter() - started)
        if by_size[str(size)] >= max(by_size.values()):
            best_out = out
    best = max(by_size, key=lambda k: by_size[k])
    result = {"best_batch_size": int(best), "per_s": by_size[best], "per_s_by_batch_size": by_size}
    result.update(meter.stop())
    return result, best_out


def embed_ceiling(
    snapshot: Path,
    device: str,
    dtype_name: str,
    corpus: list[str],
    singles: list[str],
    batch_sizes: Sequence[int],
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(snapshot), device=device, **_model_kwargs(dtype_name))
    model.eval()

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out: np.ndarray = model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return out

    encode(corpus[:8], 8)  # warm-up
    result, vectors = _sweep(lambda size: encode(corpus, size), len(corpus), batch_sizes)
    encode(singles[:2], 1)
    latencies = []
    single_vectors = []
    for text in singles:
        started = time.perf_counter()
        single_vectors.append(encode([text], 1)[0])
        latencies.append(time.perf_counter() - started)
    result["single_text_p50_ms"] = 1000 * statistics.median(latencies)
    result["single_text_per_s"] = len(singles) / sum(latencies)
    return result, vectors, np.stack(single_vectors)


def rerank_ceiling(
    snapshot: Path,
    device: str,
    dtype_name: str,
    query: str,
    documents: list[str],
    batch_sizes: Sequence[int],
) -> tuple[dict[str, Any], np.ndarray]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(snapshot), device=device, **_model_kwargs(dtype_name))
    model.eval()
    pairs = [(query, doc) for doc in documents]

    def predict(items: list[tuple[str, str]], batch_size: int) -> np.ndarray:
        out: np.ndarray = model.predict(
            items, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return out

    predict(pairs[:8], 8)  # warm-up
    result, scores = _sweep(lambda size: predict(pairs, size), len(pairs), batch_sizes)
    return result, scores


def tokenizer_rate(snapshot: Path, texts: list[str], pairs_with: str | None = None) -> float:
    """Texts (or query-document pairs) per second, one thread, 64 at a time as the server."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
    started = time.perf_counter()
    for i in range(0, len(texts), 64):
        chunk = texts[i : i + 64]
        if pairs_with is None:
            tokenizer(chunk, truncation=True, max_length=513)
        else:
            for doc in chunk:  # one pair at a time: no batch parallelism in Rust
                tokenizer(pairs_with, doc, truncation="longest_first", max_length=8192)
    return len(texts) / (time.perf_counter() - started)


def token_counts(snapshot: Path, texts: list[str], query: str | None = None) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
    if query is None:
        ids = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    else:
        ids = tokenizer([query] * len(texts), texts)["input_ids"]
    return [len(row) for row in ids]


def model_config(snapshot: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(snapshot))
