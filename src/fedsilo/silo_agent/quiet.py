"""A silo's log says what the silo does, not what its libraries do on the way.

`setup_logging` is called by `fedsilo silo-agent` before the agent starts (the one entry
point of local runs and silo pods alike). It sends every logger through one handler with
the silo's prefix and removes third-party noise that a silo operator cannot act on:

- progress bars (transformers' "Loading weights", hub downloads): none in a log file;
- transformers' LOAD REPORT when the only keys it reports are the fresh classification head
  of a sequence-classification job: that head is expected and trained with the adapter, so
  it becomes one info line. Any other missing, unexpected or mismatched key stays a warning;
- FutureWarning / DeprecationWarning raised inside torch, transformers, peft or the hub
  about each other's APIs. Every other Python warning is kept, as a log line.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

__all__ = ["LoadReportFilter", "setup_logging"]

LIBRARIES = r"(transformers|peft|torch|huggingface_hub|accelerate|safetensors|tokenizers)(\.|$)"
HEAD_KEYS = re.compile(r"^(classifier|score|pre_classifier|classification_head)(\.|$)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"^\s*(\S+)\s*\|\s*([A-Z]+)\s*\|")


class LoadReportFilter(logging.Filter):
    """Turns a LOAD REPORT that only names a new classification head into one info line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("transformers") or "LOAD REPORT" not in str(record.msg):
            return True
        text = ANSI.sub("", record.getMessage())
        rows = [(m.group(1), m.group(2)) for m in map(ROW.match, text.splitlines()) if m and m.group(1) != "Key"]
        if rows and all(status == "MISSING" and HEAD_KEYS.match(key) for key, status in rows):
            keys = ", ".join(sorted(key for key, _ in rows))
            record.msg = f"new classification head ({keys}): initialised here, trained with the adapter"
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:  # something else is missing or unexpected: keep the warning, minus the terminal colours
            record.msg, record.args = text, ()
        return True


def setup_logging(silo: str, level: int = logging.INFO) -> None:
    """Route every log record through one `<time> silo <name> <LEVEL> <message>` handler, minus the noise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s silo {silo} %(levelname)s %(message)s"))
    handler.addFilter(LoadReportFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    logging.captureWarnings(True)  # the warnings that remain get the silo's prefix and a timestamp

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()  # its records reach our handler instead of bare stderr
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
