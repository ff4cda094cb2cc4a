"""The errors a user can fix by changing an argument, a file or the config: the CLI prints their
message in one line instead of a traceback."""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.engine import EngineError
from pipeline.ingest import IngestError
from pipeline.report import ReportError
from pipeline.scorer import ScorerError
from pipeline.select import SelectError
from pipeline.weights import WeightsError

USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    ConfigError,
    EngineError,
    IngestError,
    ReportError,
    ScorerError,
    SelectError,
    WeightsError,
)
