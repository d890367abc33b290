"""Length-prefixed frames over a Unix socket, between the server and its worker processes
(the engine process, and the tokenizer processes).

A frame is ``<u32 length><u8 kind><payload>`` where ``length`` counts the kind byte and
the payload. Token ids and outputs travel as raw little-endian int32 / float32 arrays, so
neither side pickles anything and a batch of 64 texts costs a few memory copies.

Both ends use the same helpers: the server reads with asyncio streams, the worker
processes with a blocking socket in their own threads.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]

_HEAD = struct.Struct("<IB")
MAX_FRAME = 1 << 30  # a frame this large is a bug, not a batch


class Kind:
    """Frame kinds. Server → worker: CONFIG, CALL, STOP. Worker → server: READY, DONE
    (rows of floats), TOKENS (token ids), FAILED."""

    CONFIG = 1
    READY = 2
    CALL = 3
    DONE = 4
    FAILED = 5
    STOP = 6
    TOKENS = 7


def frame(kind: int, *parts: bytes | memoryview) -> bytes:
    body = b"".join(parts)
    return _HEAD.pack(len(body) + 1, kind) + body


def json_frame(kind: int, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj).encode())


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the peer has gone."""
    length, kind = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if not 1 <= length <= MAX_FRAME:
        raise ConnectionError(f"bad frame length {length}")
    return kind, await reader.readexactly(length - 1)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """Blocking read of the next frame; None when the peer has closed the socket."""
    head = _recv_exactly(sock, _HEAD.size)
    if head is None:
        return None
    length, kind = _HEAD.unpack(head)
    if not 1 <= length <= MAX_FRAME:
        raise ConnectionError(f"bad frame length {length}")
    body = _recv_exactly(sock, length - 1)
    if body is None:
        return None
    return kind, body


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:], n - got)
        if count == 0:
            return None
        got += count
    return bytes(buffer)


# --- payloads -------------------------------------------------------------------------
_CALL = struct.Struct("<QHI")  # call id, target (model index), rows
_DONE = struct.Struct("<QIIdB")  # call id, rows, columns, seconds the work took, graph
_FAILED = struct.Struct("<Q")


def pack_sequences(call_id: int, target: int, rows: Sequence[IdArray]) -> bytes:
    """A call carrying ``rows`` of token ids (lengths first, then all ids end to end)."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int32, count=len(rows))
    ids = np.concatenate(rows).astype("<i4", copy=False) if rows else np.empty(0, "<i4")
    return frame(
        Kind.CALL, _CALL.pack(call_id, target, len(rows)), lengths.tobytes(), ids.tobytes()
    )


def unpack_sequences(body: bytes) -> tuple[int, int, list[IdArray]]:
    call_id, target, n = _CALL.unpack_from(body)
    lengths = np.frombuffer(body, dtype="<i4", count=n, offset=_CALL.size)
    ids = np.frombuffer(body, dtype="<i4", offset=_CALL.size + 4 * n)
    bounds = np.cumsum(lengths)
    return call_id, target, np.split(ids, bounds[:-1]) if n else []


def pack_done(call_id: int, out: FloatArray, seconds: float, graph: bool = False) -> bytes:
    """A batch's rows, the device time it took, and whether it replayed a CUDA graph."""
    out = np.ascontiguousarray(out, dtype="<f4")
    rows, columns = (out.shape[0], out.shape[1]) if out.ndim == 2 else (out.shape[0], 1)
    return frame(Kind.DONE, _DONE.pack(call_id, rows, columns, seconds, graph), out.data)


def unpack_done(body: bytes) -> tuple[int, FloatArray, float, bool]:
    call_id, rows, columns, seconds, graph = _DONE.unpack_from(body)
    out = np.frombuffer(body, dtype="<f4", count=rows * columns, offset=_DONE.size)
    return call_id, out.reshape(rows, columns), seconds, bool(graph)


def pack_failed(call_id: int, error: dict[str, Any]) -> bytes:
    return frame(Kind.FAILED, _FAILED.pack(call_id), json.dumps(error).encode())


def unpack_failed(body: bytes) -> tuple[int, dict[str, Any]]:
    (call_id,) = _FAILED.unpack_from(body)
    error: dict[str, Any] = json.loads(body[_FAILED.size :])
    return call_id, error


# --- texts and their tokens (tokenizer worker processes) ---------------------------------
# call id, target (model index), operation, its limit (pairs: tokens per document, 0: none),
# texts
_TEXTS = struct.Struct("<QHBII")
_TOKENS = struct.Struct("<QI")  # call id, items


def pack_texts(
    call_id: int, target: int, operation: int, limit: int, texts: Sequence[str]
) -> bytes:
    encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
    lengths = struct.pack(f"<{len(encoded)}i", *map(len, encoded))
    head = _TEXTS.pack(call_id, target, operation, limit, len(encoded))
    return frame(Kind.CALL, head, lengths, *encoded)


def unpack_texts(body: bytes) -> tuple[int, int, int, int, list[str]]:
    call_id, target, operation, limit, n = _TEXTS.unpack_from(body)
    lengths = np.frombuffer(body, dtype="<i4", count=n, offset=_TEXTS.size).tolist()
    texts, start = [], _TEXTS.size + 4 * n
    for length in lengths:
        texts.append(body[start : start + length].decode("utf-8", "surrogatepass"))
        start += length
    return call_id, target, operation, limit, texts


def pack_tokens(
    call_id: int,
    rows: Sequence[IdArray],
    original: Sequence[int],
    truncated: Sequence[bool],
    char_limits: Sequence[int],
) -> bytes:
    """Each item's ids, its tokens before the cut, whether it was cut, and the characters
    read of its text where they were cut (0: all were): ``Encoded``'s fields."""
    n = len(rows)
    lengths = np.fromiter((len(row) for row in rows), dtype="<i4", count=n)
    ids = np.concatenate(rows).astype("<i4", copy=False) if n else np.empty(0, "<i4")
    return frame(
        Kind.TOKENS,
        _TOKENS.pack(call_id, n),
        lengths.tobytes(),
        np.asarray(original, dtype="<i4").tobytes(),
        np.asarray(char_limits, dtype="<i4").tobytes(),
        np.asarray(truncated, dtype=np.uint8).tobytes(),
        ids.tobytes(),
    )


def unpack_tokens(body: bytes) -> tuple[int, list[IdArray], list[int], list[bool], list[int]]:
    call_id, n = _TOKENS.unpack_from(body)
    offset = _TOKENS.size
    numbers = struct.unpack_from(f"<{3 * n}i", body, offset)
    truncated = [bool(t) for t in body[offset + 12 * n : offset + 13 * n]]
    ids = np.frombuffer(body, dtype="<i4", offset=offset + 13 * n)
    rows, start = [], 0
    for length in numbers[:n]:
        rows.append(ids[start : start + length])
        start += length
    return call_id, rows, list(numbers[n : 2 * n]), truncated, list(numbers[2 * n :])
