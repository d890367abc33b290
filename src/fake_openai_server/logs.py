"""Logging set-up: plain or one JSON object per line. Request texts are never logged."""

from __future__ import annotations

import json
import logging
import time


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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Libraries that chatter at INFO about things an operator need not see.
    for name in ("httpx", "huggingface_hub", "sentence_transformers", "transformers"):
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
