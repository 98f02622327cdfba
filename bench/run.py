"""`make bench`: every benchmark in one run, then one summary table.

A benchmark is a function taking the parsed arguments and returning rows; add it to BENCHMARKS.
The server-against-Postfix comparisons (DESIGN.md, "Performance notes") belong here too, measured
in the same run so the figures are comparable.

    python bench/run.py [--messages N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine


@dataclass(frozen=True)
class Row:
    benchmark: str
    case: str
    msgs_per_s: float | None
    mb_per_s: float | None
    target: str = ""


def engine_rows(args: argparse.Namespace) -> list[Row]:
    figures = engine.main(["--messages", str(args.messages), "--size", str(args.size),
                           "--per-connection", str(args.per_connection)])
    target = f">= {engine.TARGET_MB_S:.0f} MB/s"
    return [Row("engine", f.name, f.msgs_per_s if f.messages > 1 else None, f.mb_per_s,
                target + (" ok" if f.mb_per_s >= engine.TARGET_MB_S else " BELOW"))
            for f in figures]


BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "engine": engine_rows,
}


def print_table(rows: list[Row]) -> None:
    headers = ("benchmark", "case", "msgs/s", "MB/s", "target")
    cells = [
        (r.benchmark, r.case,
         f"{r.msgs_per_s:,.0f}" if r.msgs_per_s is not None else "-",
         f"{r.mb_per_s:,.1f}" if r.mb_per_s is not None else "-",
         r.target)
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = (False, False, True, True, False)

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print(line(c))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=2048, help="body octets per message")
    parser.add_argument("--per-connection", type=int, default=100, help="messages per connection")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)

    print(f"mailward bench: Python {platform.python_version()} on {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    rows: list[Row] = []
    for name, bench in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"--- {name}", flush=True)
        rows += bench(args)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
