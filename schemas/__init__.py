"""Pydantic contracts shared by the engine, the CLI, the API and the workers."""

from schemas.options import Defense, SanitizeOptions
from schemas.report import REPORT_SCHEMA_VERSION, SanitizeReport

__all__ = ["REPORT_SCHEMA_VERSION", "Defense", "SanitizeOptions", "SanitizeReport"]
