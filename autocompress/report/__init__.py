"""Study reports: report.md and a self-contained report.html (``autocompress report``)."""

from autocompress.report.build import write_report

__all__ = ["write_report"]
