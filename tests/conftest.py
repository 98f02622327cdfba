"""The hostile-input summary printed at the end of `make test`.

Tests report their figures with `record_property("hostile", (name, tried, handled))` and other
measurements as `record_property("hostile_note", text)` (see tests/integration/hostile.py). They
travel in each test report, so they are summed here whichever process or directory ran the test.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    figures: dict[str, list[int]] = {}
    notes: list[str] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == "hostile_note":  # a measured figure that is not a count, e.g. memory
                    notes.append(str(value))
                if name != "hostile":
                    continue
                label, tried, handled = value
                row = figures.setdefault(label, [0, 0])
                row[0] += tried
                row[1] += handled
    if not figures and not notes:
        return
    width = max((len(label) for label in figures), default=0)
    terminalreporter.section("hostile input: tried / handled")
    for label in sorted(figures):
        tried, handled = figures[label]
        mark = "" if tried == handled else "   <-- NOT ALL HANDLED"
        terminalreporter.write_line(f"{label:<{width}}  {tried:>7} tried  {handled:>7} handled{mark}")
    for note in sorted(notes):
        terminalreporter.write_line(note)
