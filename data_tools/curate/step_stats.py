"""Step statistics in report.json: what a step measured besides its counts (CLIP-score percentiles, the
clusters SemDeDup made, the samples each balancing entry admitted)."""
from __future__ import annotations

from data_tools.curate.report import Report


def attach_stats(report: Report, stats: dict) -> None:
    """Put `stats` under "stats" in the step's section of report.json (Report.to_dict)."""
    if isinstance(getattr(report, "stats", None), dict):
        report.stats.update(stats)
        return
    # Report has no place for step statistics yet: extend this report's to_dict (an instance attribute
    # shadows the method), so report.json gets them without a change to Report.
    to_dict = report.to_dict
    report.to_dict = lambda: {**to_dict(), "stats": stats}
