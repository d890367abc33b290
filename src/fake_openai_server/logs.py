"""Logging set-up: plain or one JSON object per line. Request texts are never logged."""

from __future__ import annotations

import json
import logging
import time
import traceback
from types import TracebackType

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# Control characters as escapes: a client's text (a path, say) cannot start a log line.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def printable(text: str) -> str:
    """``text`` with its control characters escaped, for a log line."""
    return text.translate(_CONTROL)


class PlainFormatter(logging.Formatter):
    """One line per record; an exception as its type and its frames, not its message:
    the message of an unforeseen error may quote a request's text (a tokenizer's error
    about the string it read, a model's about the ids it got)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: ExcInfo | tuple[None, None, None]) -> str:
        kind, _, frames = ei
        name = kind.__name__ if kind is not None else "exception"
        stack = "".join(traceback.format_tb(frames))
        return f"Traceback (most recent call last):\n{stack}{name} (its message is not logged)"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Libraries that chatter at INFO about things an operator need not see.
    # huggingface_hub's client is httpx2, which logs every request (each file of a model).
    for name in ("httpx", "httpx2", "huggingface_hub", "sentence_transformers", "transformers"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


# Libraries that install their own stderr handler when imported (transformers does not
# even propagate to the root logger), bypassing the format chosen here.
LIBRARY_LOGGERS = ("huggingface_hub", "transformers", "sentence_transformers")


def adopt_library_loggers() -> None:
    """Call after importing the model libraries: their records go through our handler."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
