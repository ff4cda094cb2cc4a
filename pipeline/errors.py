"""The errors a user can fix by changing an argument, a file or the config: the CLI prints their
message in one line instead of a traceback."""

from __future__ import annotations

import importlib

_USER_ERRORS = [
    ("pipeline.scorer", "ScorerError"),
    ("pipeline.engine", "EngineError"),
    ("pipeline.config", "ConfigError"),
    ("pipeline.ingest", "IngestError"),
    ("pipeline.weights", "WeightsError"),
    ("pipeline.select", "SelectError"),
    ("pipeline.report", "ReportError"),
]


def _collect() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError]
    for module, name in _USER_ERRORS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


USER_ERRORS = _collect()
