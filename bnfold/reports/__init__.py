"""Result objects: each knows whether it passed, serializes to JSON and renders itself with Rich."""

from bnfold.reports.base import SCHEMA_VERSION, Report

__all__ = ["SCHEMA_VERSION", "Report"]
