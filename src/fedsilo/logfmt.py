"""Log lines as logfmt (`ts=... level=info event=upload job=demo round=2 ...`).

One format for every fedsilo process that logs for machines as much as for people: each
line is one record, `key=value` pairs, values quoted only when they need it, so `grep`,
Loki and `kubectl logs | grep event=refused` all work. An event is logged with
`event(logger, "upload", job=..., round=...)`; plain `log.info("...")` lines keep working
and come out as `msg="..."`. Standard library only: every layer may use it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

__all__ = ["Logfmt", "event", "quote"]

_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-,]+$")


def quote(value: Any) -> str:
    """A logfmt value: bare when safe, else double-quoted with escapes; floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Logfmt(logging.Formatter):
    """`ts=<UTC, ms> level=<level> [proc=<name>] [event=<event> k=v ...] [msg="..."]`, tracebacks escaped in `error`."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={stamp}", f"level={record.levelname.lower()}"]
        if self.process:
            parts.append(f"proc={quote(self.process)}")
        name = getattr(record, "event", None)
        if name:
            parts.append(f"event={quote(name)}")
            parts.extend(f"{key}={quote(value)}" for key, value in getattr(record, "fields", {}).items())
        else:
            parts.append(f"logger={quote(record.name)}")
            parts.append(f"msg={quote(record.getMessage())}")
        if record.exc_info:
            parts.append(f"error={quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one structured event; readable by humans as a sentence of key=value pairs."""
    if logger.isEnabledFor(level):
        summary = " ".join(f"{k}={quote(v)}" for k, v in fields.items())
        logger.log(level, "%s %s", name, summary, extra={"event": name, "fields": fields})
