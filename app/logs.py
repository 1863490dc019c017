"""Logging setup: readable lines by default, JSON lines (with event id, topic, partition, offset) on request."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from app.settings import get_settings

_CONTEXT = ("event_id", "topic", "partition", "offset", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, carrying the processing context riskwatch attaches to errors."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging() -> None:
    """Configure the root logger from RISKWATCH_LOG_LEVEL and RISKWATCH_LOG_JSON."""
    s = get_settings()
    handler = logging.StreamHandler()
    if s.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(s.log_level.upper())
    # Client libraries log every refused reconnect as an error; riskwatch reports unreachable brokers itself.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


__all__ = ["JsonFormatter", "setup_logging"]
