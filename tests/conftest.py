"""The hostile-input summary printed at the end of `make test`.

Tests report their figures with `record_property("hostile", (name, tried, handled))` (see
tests/integration/hostile.py); the figures travel in each test report, so they are summed here
whichever process or directory the test ran in.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    figures: dict[str, list[int]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name != "hostile":
                    continue
                label, tried, handled = value
                row = figures.setdefault(label, [0, 0])
                row[0] += tried
                row[1] += handled
    if not figures:
        return
    width = max(len(label) for label in figures)
    terminalreporter.section("hostile input: tried / handled")
    for label in sorted(figures):
        tried, handled = figures[label]
        mark = "" if tried == handled else "   <-- NOT ALL HANDLED"
        terminalreporter.write_line(f"{label:<{width}}  {tried:>7} tried  {handled:>7} handled{mark}")
