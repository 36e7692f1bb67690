"""``pcam-report``: one self-contained HTML page of plotly figures for a study (and its refit).

``page`` assembles the page and holds the command; ``study_figures`` and ``refit_figures``
draw the sections.
"""

from search.report.page import SECTIONS, all_failed, main, parser, render, sections, write_report

__all__ = ["SECTIONS", "all_failed", "main", "parser", "render", "sections", "write_report"]
