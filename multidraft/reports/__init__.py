"""Acceptance comparison reports: tables, JSON and plots."""

from .compare import CompareConfig, Row, markdown_table, run_compare, write_report
from .families import FAMILIES

__all__ = ["CompareConfig", "FAMILIES", "Row", "markdown_table", "run_compare", "write_report"]
