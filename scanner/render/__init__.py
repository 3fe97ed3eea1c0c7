"""Renderings of the one report schema (:class:`scanner.report.ScanReport`): text, SARIF 2.1.0, HTML.

JSON is ``ScanReport.to_json()`` itself. Every renderer reads only the report (plus, for HTML, the
trigger images the pipeline saved next to it), so all outputs agree by construction.
"""

from __future__ import annotations

from scanner.render.sarif import to_sarif
from scanner.render.text import to_text

__all__ = ["to_sarif", "to_text"]
