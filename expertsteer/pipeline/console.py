"""Console and log-file output: stage headers, warnings and errors on the console; every
other line in the run's log file (or on the console with `--verbose`)."""

from __future__ import annotations

import logging

CONSOLE_LOGGERS = (
    "expertsteer.pipeline.experiment",
    "expertsteer.pipeline.stages",
    "expertsteer.pipeline.cli",
)
"""Loggers whose INFO lines reach the console by default (stage headers, choices made for the
user); every other INFO line (per batch, per layer, Lightning's notices) goes to the run's log
file, or to the console with `--verbose`."""
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("💡 Tip"):
            return False  # third-party advertising
        if self.verbose or record.name in CONSOLE_LOGGERS:
            return True
        # Python warnings are third-party notices (Lightning's batch-count hints, deprecations).
        return record.levelno >= logging.WARNING and record.name != "py.warnings"


def route_lightning_logs() -> None:
    """Lightning's loggers lose the console handlers they add on import and go through the
    root logger (the console filter, the run's log file)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class _ConsoleFormatter(logging.Formatter):
    """Headers as plain lines; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING and record.name in CONSOLE_LOGGERS:
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


def configure_logging(verbose: bool = False) -> None:
    """The console handler (unless the process configured logging already, e.g. pytest):
    stage headers, warnings and errors by default, everything with `verbose`."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.captureWarnings(True)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT) if verbose else _ConsoleFormatter())
    handler.addFilter(_ConsoleFilter(verbose))
    root.addHandler(handler)
