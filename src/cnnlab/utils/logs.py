"""How the package reports: `logging` under the "cnnlab" logger. A library leaves handlers to its
caller; the entry points (stage scripts, the command line) call `configure` for plain lines on
stderr, where DVC shows them, with a "warning:" or "error:" prefix where it matters."""

from __future__ import annotations

import logging
import sys


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure(level: int = logging.INFO) -> None:
    """Show the package's messages of ``level`` and above on stderr (once per process)."""
    logger = logging.getLogger("cnnlab")
    if not any(getattr(h, "_cnnlab", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Plain("%(message)s"))
        handler._cnnlab = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
