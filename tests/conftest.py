"""The hostile-input and fault summaries printed at the end of `make test`.

Tests report their figures with `record_property("hostile", (name, tried, handled))` and other
measurements as `record_property("hostile_note", text)` (see tests/integration/hostile.py); the
fault tests (tests/integration/test_faults_*.py) use "fault" and "fault_note" the same way. They
travel in each test report, so they are summed here whichever process or directory ran the test.
"""

from __future__ import annotations

from typing import Any

import pytest

# property name of the counts -> (property name of the notes, section title)
SECTIONS = {
    "hostile": ("hostile_note", "hostile input: tried / handled"),
    "fault": ("fault_note", "faults: tried / handled"),
}


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for kind, (note_kind, title) in SECTIONS.items():
        _section(terminalreporter, kind, note_kind, title)


def _section(terminalreporter: Any, kind: str, note_kind: str, title: str) -> None:
    figures: dict[str, list[int]] = {}
    notes: list[str] = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == note_kind:  # a measured figure that is not a count, e.g. memory
                    notes.append(str(value))
                if name != kind:
                    continue
                label, tried, handled = value
                row = figures.setdefault(label, [0, 0])
                row[0] += tried
                row[1] += handled
    if not figures and not notes:
        return
    width = max((len(label) for label in figures), default=0)
    terminalreporter.section(title)
    for label in sorted(figures):
        tried, handled = figures[label]
        mark = "" if tried == handled else "   <-- NOT ALL HANDLED"
        terminalreporter.write_line(f"{label:<{width}}  {tried:>7} tried  {handled:>7} handled{mark}")
    for note in sorted(notes):
        terminalreporter.write_line(note)
