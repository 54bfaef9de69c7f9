"""Logging setup: structlog, JSON or console, with a level filter; events have stable names."""

from __future__ import annotations

import logging
import sys

import structlog

from ..config import LoggingConfig


def configure_logging(cfg: LoggingConfig, *, worker: int | None = None) -> None:
    level = logging.getLevelNamesMapping()[cfg.level.upper()]
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:
        processors.append(_add_worker(worker))
    if cfg.format == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Plain tracebacks: the default (rich, when installed) prints every frame's local
        # variables, and those may hold passwords.
        processors.append(structlog.dev.ConsoleRenderer(colors=False,
                                                        exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add_worker(worker: int) -> structlog.types.Processor:
    def processor(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        event["worker"] = worker
        return event

    return processor
