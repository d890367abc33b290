"""A tokenizer process: ``python -m fake_openai_server.service.tokenize_worker FD``.

Started by the server's tokenizer pool (``service/tokenizing.py``) when the machine has
cores to spare. It opens the served models' tokenizers (the backend plugin's
``open_tokenizer``), then turns each CALL of texts into token ids, one call at a time,
with a GIL of its own. It ends when the server says STOP or goes away.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from fake_openai_server import logs, wire
from fake_openai_server.backends.base import Encoded, ModelInfo, Tokenizer

log = logging.getLogger(__name__)

# Operations: texts → ids; [query, *documents] → pair ids, with each document cut to
# its first ``document_tokens`` tokens (0: no such cut; the wire frame's limit).
ENCODE, PAIRS = 1, 2


def tokenize(
    tokenizer: Tokenizer, operation: int, document_tokens: int, texts: list[str]
) -> list[Encoded]:
    if operation == PAIRS:
        return tokenizer.encode_pairs(texts[0], texts[1:], document_tokens or None)
    return tokenizer.encode(texts)


def pack(call_id: int, encoded: list[Encoded]) -> bytes:
    return wire.pack_tokens(
        call_id,
        [item.ids for item in encoded],
        [item.original_length for item in encoded],
        [item.truncated for item in encoded],
        [item.char_limit for item in encoded],
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # The server decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    message = wire.recv_frame(sock)
    if message is None or message[0] != wire.Kind.CONFIG:
        raise SystemExit("tokenizer: no configuration from the server")
    config: dict[str, Any] = json.loads(message[1])
    logs.configure(config["log_level"], config["log_json"])
    try:
        plugin = importlib.import_module(config["plugin"])
        tokenizers: list[Tokenizer] = [
            plugin.open_tokenizer(ModelInfo.from_dict(info), config["options"])
            for info in config["models"]
        ]
    except Exception as exc:
        log.error("cannot open the tokenizers: %s: %s", type(exc).__name__, exc)
        sock.sendall(wire.json_frame(wire.Kind.FAILED, {"error": type(exc).__name__}))
        raise SystemExit(1) from None
    sock.sendall(wire.json_frame(wire.Kind.READY, {"pid": os.getpid()}))
    while (message := wire.recv_frame(sock)) is not None:
        kind, body = message
        if kind == wire.Kind.STOP:
            break
        call_id, target, operation, document_tokens, texts = wire.unpack_texts(body)
        try:
            encoded = tokenize(tokenizers[target], operation, document_tokens, texts)
        except Exception as exc:
            # The type only: the message may quote the text.
            log.error("tokenizing failed: %s", type(exc).__name__)
            sock.sendall(wire.pack_failed(call_id, {"type": type(exc).__name__}))
            continue
        sock.sendall(pack(call_id, encoded))


if __name__ == "__main__":
    main()
