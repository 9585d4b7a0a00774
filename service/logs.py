"""Logs as JSON lines: one object per line, for machines first (and ``jq`` for people).

Every record carries ``ts``, ``level``, ``logger`` and ``msg``; what a caller passes in
``extra={"fields": {...}}`` is merged in (the access log's request id, route, status, ...).
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the service and uvicorn: everything as JSON lines
    on stderr. (uvicorn's own access log is off: ``gradsvc.access`` logs each request.)"""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    loggers = {
        name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
        for name in ("gradsvc", "uvicorn", "uvicorn.error")
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"default": handler},
        "loggers": loggers,
    }


def setup(level: str = "info") -> None:
    logging.config.dictConfig(config(level))
