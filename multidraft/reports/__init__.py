"""Comparison reports: acceptance against the optimum, engine block efficiency, verify cost."""

from .compare import (
    CompareConfig,
    CostRow,
    EngineRow,
    Report,
    Row,
    cost_table,
    engine_table,
    markdown_table,
    run_report,
    write_report,
)
from .families import FAMILIES

__all__ = [
    "FAMILIES",
    "CompareConfig",
    "CostRow",
    "EngineRow",
    "Report",
    "Row",
    "cost_table",
    "engine_table",
    "markdown_table",
    "run_report",
    "write_report",
]
