"""In-process measurements: the machine, CPU meters, FLOPs, the matmul and model ceilings."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system, all threads) of one process."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants (from the parent ids in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree: each process's own plus its reaped children's.

    A child that exits and is reaped moves its time into its parent's ``cutime``,
    so the sum stays continuous while worker processes come and go.
    """
    total = 0
    for member in process_tree(pid):
        fields = _stat(member)
        if fields:
            total += sum(int(v) for v in fields[11:15])
    return total / _TICK


def _status_kib(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return None


def peak_rss_mib(pid: int) -> float:
    """Peak RSS (VmHWM) summed over the process tree of ``pid``, in MiB.

    Each process's own peak: when they peak at different times the sum overstates
    the tree's peak, and pages shared between processes count once per process.
    """
    values = [_status_kib(member, "VmHWM:") for member in process_tree(pid)]
    known = [v for v in values if v is not None]
    return sum(known) / 1024 if known else float("nan")


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) now, summed over the process tree of ``pid``, in MiB."""
    values = [_status_kib(member, "VmRSS:") for member in process_tree(pid)]
    known = [v for v in values if v is not None]
    return sum(known) / 1024 if known else float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Start a new VmHWM window in every process of the tree; False where not allowed."""
    try:
        for member in process_tree(pid):
            Path(f"/proc/{member}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy() -> tuple[float, float]:
    """CPU seconds since boot, all cores: busy here, and stolen by the hypervisor."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


# --- GPU utilisation ----------------------------------------------------------------
class GpuSampler:
    """GPU busy % and memory in use, sampled in the background for a whole run.

    ``nvidia-smi -lms`` in a subprocess where it exists, else ``torch.cuda.utilization``
    (needs pynvml) in a thread, else nothing (every figure then reads n/a). Busy is
    the driver's "utilization.gpu": the share of time a kernel was running. Memory is
    the whole device's (every process on it), not the server's alone.
    """

    INTERVAL_S = 0.2

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, busy %, MiB)
        self.source = "none"
        self._process: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
        command = [
            "nvidia-smi",
            f"--id={index}",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            f"--loop-ms={int(self.INTERVAL_S * 1000)}",
        ]
        if shutil.which("nvidia-smi"):
            with contextlib.suppress(OSError):
                self._process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
                self._thread = threading.Thread(target=self._read_smi, daemon=True)
                self._thread.start()
                deadline = time.monotonic() + 3
                while not self.samples and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.samples:
                    self.source = "nvidia-smi"
                else:  # it failed or prints nothing usable (e.g. "[N/A]"): try torch
                    self.stop()
                    self._process = self._thread = None
                    self._stop.clear()
        if self._thread is None and self._torch_sample() is not None:
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
            self._thread.start()
        return self

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            busy, _, memory = line.partition(",")
            with contextlib.suppress(ValueError):
                self.samples.append((time.monotonic(), float(busy), float(memory)))

    @staticmethod
    def _torch_sample() -> tuple[float, float] | None:
        try:
            import torch

            busy = float(torch.cuda.utilization())
            free, total = torch.cuda.mem_get_info()
        except Exception:  # no pynvml, no CUDA: no sampling
            return None
        return busy, (total - free) / 2**20

    def _poll_torch(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            sample = self._torch_sample()
            if sample is not None:
                self.samples.append((time.monotonic(), *sample))

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def window(self, started: float, ended: float) -> dict[str, Any]:
        """Mean busy % and peak memory over the samples taken between two monotonic times.

        A sample describes the period before it: the first one after ``started`` is
        skipped when later ones exist.
        """
        inside = [s for s in self.samples if started <= s[0] <= ended]
        if len(inside) > 2:
            inside = inside[1:]
        if not inside:
            return {"gpu_busy": None, "gpu_memory_mib": None, "gpu_samples": 0}
        return {
            "gpu_busy": statistics.fmean(s[1] for s in inside) / 100,
            "gpu_memory_mib": max(s[2] for s in inside),
            "gpu_samples": len(inside),
        }


_gpu: GpuSampler | None = None


@contextlib.contextmanager
def sample_gpu(device: str) -> Iterator[GpuSampler | None]:
    """Sample the GPU for the duration (on CUDA); every :class:`Meter` reads its window."""
    global _gpu
    if device != "cuda":
        yield None
        return
    _gpu = GpuSampler().start()
    try:
        yield _gpu
    finally:
        _gpu.stop()
        _gpu = None


@dataclass
class Meter:
    """Wall time and CPU time of the benchmark, the server's process tree and the rest.

    On CUDA (inside :func:`sample_gpu`) also the GPU's mean busy share and memory.
    """

    server_pid: int | None = None
    wall: float = field(default_factory=time.perf_counter)
    monotonic: float = field(default_factory=time.monotonic)
    bench: float = field(default_factory=time.process_time)
    machine: tuple[float, float] = field(default_factory=machine_busy)
    server: float = 0.0
    members: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.server_pid is not None:
            self.server = tree_cpu(self.server_pid)
            self.members = {pid: process_cpu(pid) for pid in process_tree(self.server_pid)}

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        bench = time.process_time() - self.bench
        server = tree_cpu(self.server_pid) - self.server if self.server_pid else 0.0
        busy, steal = machine_busy()
        other = max(0.0, busy - self.machine[0] - bench - server)
        out: dict[str, Any] = {
            "wall_s": wall,
            "client_cpu_s": bench,
            "other_load_cores": other / wall,
            "stolen_cores": (steal - self.machine[1]) / wall,
        }
        if self.server_pid is not None:
            out["server_cpu_cores"] = server / wall
            out["server_processes"] = len(process_tree(self.server_pid))
            # The API process alone, and the busiest of the others (the engine, mostly):
            # one near 1.0 is a process bound by its own GIL.
            own = {pid: process_cpu(pid) - before for pid, before in self.members.items()}
            out["api_cpu_cores"] = own.pop(self.server_pid, 0.0) / wall
            out["busiest_child_cpu_cores"] = max(own.values(), default=0.0) / wall
        if _gpu is not None:
            out.update(_gpu.window(self.monotonic, time.monotonic()))
            out["gpu_sampler"] = _gpu.source
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


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _sweep(
    run: Callable[[int], Any], n: int, batch_sizes: Sequence[int], device: str
) -> tuple[dict[str, Any], Any]:
    """Time ``run(batch_size)`` over ``n`` items for each batch size; keep the best."""
    by_size: dict[str, float] = {}
    best_out: Any = None
    meter = Meter()
    for size in batch_sizes:
        _sync(device)
        started = time.perf_counter()
        out = run(size)
        _sync(device)
        by_size[str(size)] = n / (time.perf_counter() - started)
        if by_size[str(size)] >= max(by_size.values()):
            best_out = out
    best = max(by_size, key=lambda k: by_size[k])
    result = {"best_batch_size": int(best), "per_s": by_size[best], "per_s_by_batch_size": by_size}
    result.update(meter.stop())
    return result, best_out


# --- the model alone: pre-tokenized, length-sorted, padded batches; forward + pooling ---------
def _padded(rows: Sequence[Sequence[int]], pad_id: int, device: str) -> dict[str, Any]:
    """input_ids / attention_mask for ``rows``, padded on the right as the server pads."""
    import torch

    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def model_alone(
    forward: Callable[[dict[str, Any]], Any],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
    batch_sizes: Sequence[int],
    singles: Sequence[Sequence[int]] = (),
) -> dict[str, Any]:
    """Items per second of ``forward`` alone, at the best of ``batch_sizes``.

    The items are tokenized beforehand, sorted by length (longest first) and cut
    into padded batches already on the device: what is timed is the forward pass
    and the pooling (or the classifier's activation), nothing the server must also
    do per request. Each batch size runs whole passes over the items for at least
    one second on CUDA (half a second on CPU), and at least two unless one takes over
    5 s, after a warm-up (a whole pass on CUDA, where every new shape picks its kernels;
    the shortest batch on CPU): the fastest pass counts, the first often pays for
    kernels chosen or primitives built for new shapes. With ``singles``, also the p50
    latency of one item at a time (the forward pass of one text), after a warm-up round.
    """
    import torch

    order = sorted(rows, key=len, reverse=True)
    min_seconds = 1.0 if device == "cuda" else 0.5
    by_size: dict[str, float] = {}
    meter = Meter()
    with torch.inference_mode():
        for size in batch_sizes:
            batches = [
                _padded(order[i : i + size], pad_id, device) for i in range(0, len(order), size)
            ]
            for features in batches if device == "cuda" else batches[-1:]:
                forward(dict(features))
            _sync(device)
            passes: list[float] = []
            started = time.perf_counter()
            while True:  # whole passes for min_seconds (and two unless one is slow): the fastest
                begun = time.perf_counter()
                for features in batches:
                    forward(dict(features))
                _sync(device)
                passes.append(time.perf_counter() - begun)
                if time.perf_counter() - started >= min_seconds and (
                    len(passes) >= 2 or passes[0] > 5
                ):
                    break
            fastest = min(passes)
            by_size[str(size)] = len(rows) / fastest
        result: dict[str, Any] = meter.stop()
        best = max(by_size, key=lambda k: by_size[k])
        result.update(best_batch_size=int(best), per_s=by_size[best], per_s_by_batch_size=by_size)
        if singles:
            latencies = []
            prepared = [_padded([ids], pad_id, device) for ids in singles]
            for features in prepared:  # warm-up: every length once
                forward(dict(features))
            for features in prepared:
                _sync(device)
                started = time.perf_counter()
                forward(dict(features))
                _sync(device)
                latencies.append(time.perf_counter() - started)
            result["single_text_p50_ms"] = 1000 * statistics.median(latencies)
    return result


@dataclass
class Ceiling:
    """``encode``/``predict`` at one precision, and (optionally) the model alone."""

    result: dict[str, Any]
    outputs: np.ndarray
    single_outputs: np.ndarray | None = None
    model_alone: dict[str, Any] | None = None


def embed_ceiling(
    snapshot: Path,
    device: str,
    dtype_name: str,
    corpus: list[str],
    singles: list[str],
    batch_sizes: Sequence[int],
    model_alone_sizes: Sequence[int] = (),
) -> Ceiling:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(snapshot), device=device, **_model_kwargs(dtype_name))
    model.eval()

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out: np.ndarray = model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return out

    encode(corpus[:8], 8)  # warm-up
    result, vectors = _sweep(lambda size: encode(corpus, size), len(corpus), batch_sizes, device)
    encode(singles[:2], 1)
    latencies = []
    single_vectors = []
    for text in singles:
        started = time.perf_counter()
        single_vectors.append(encode([text], 1)[0])
        latencies.append(time.perf_counter() - started)
    result["single_text_p50_ms"] = 1000 * statistics.median(latencies)
    result["single_text_per_s"] = len(singles) / sum(latencies)
    ceiling = Ceiling(result, vectors, np.stack(single_vectors))
    if model_alone_sizes:
        tokenizer = model.tokenizer
        limit = {"truncation": True, "max_length": model.max_seq_length}
        ceiling.model_alone = model_alone(
            lambda features: model(features)["sentence_embedding"],
            tokenizer(corpus, **limit)["input_ids"],
            tokenizer.pad_token_id or 0,
            device,
            model_alone_sizes,
            singles=tokenizer(singles, **limit)["input_ids"],
        )
    return ceiling


def rerank_ceiling(
    snapshot: Path,
    device: str,
    dtype_name: str,
    query: str,
    documents: list[str],
    batch_sizes: Sequence[int],
    model_alone_sizes: Sequence[int] = (),
) -> Ceiling:
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
    result, scores = _sweep(lambda size: predict(pairs, size), len(pairs), batch_sizes, device)
    ceiling = Ceiling(result, scores)
    if model_alone_sizes:
        import torch

        tokenizer = model.tokenizer
        activation = model.activation_fn or torch.nn.Identity()
        rows = tokenizer(
            [query] * len(documents),
            documents,
            truncation="longest_first",
            **({"max_length": model.max_seq_length} if model.max_seq_length else {}),
        )["input_ids"]
        ceiling.model_alone = model_alone(
            lambda features: activation(model(features)["scores"]),
            rows,
            tokenizer.pad_token_id or 0,
            device,
            model_alone_sizes,
        )
    return ceiling


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
