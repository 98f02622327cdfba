"""`make bench`: every benchmark in one run, then one summary table with mailward beside Postfix.

* engine: the sans-IO SMTP engine alone (bench/engine.py);
* server: messages accepted per second over 465, 587 and 25 with full durability, mailward and a
  throwaway loopback Postfix configured alike, back to back (bench/server.py);
* outbound: messages delivered per second to smtp-sink from a pre-filled queue (bench/outbound.py);
* dane: mailward alone, delivery to a DANE destination (DNSSEC lab, cached DNS) beside the same
  destination at level may; its ratio is dane / may, target at least 0.90 (bench/dane.py);
* idle: memory of 10,000 idle TLS sessions on 465 (bench/idle.py);
* postgres: accept and delivery with 1, 2 and 3 nodes on one PostgreSQL queue, and the scaling
  factor; one node on PostgreSQL beside one on the embedded SQLite queue (bench/postgres.py);
* soak: last, 15 minutes (`--soak-minutes`) of steady mixed submission and delivery, watched for
  growth of memory, file descriptors and queue depth (bench/soak.py; `make soak` runs it alone).

A benchmark is a function taking the parsed arguments and returning rows; add it to BENCHMARKS.
The ratio is mailward / Postfix; the DESIGN.md target is mailward at or above Postfix on every row.
The machine is shared with the load generator (and whatever else runs): compare within one run.

    python bench/run.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dane
import engine
import idle
import outbound
import postgres
import server
import soak


@dataclass(frozen=True)
class Row:
    benchmark: str
    case: str
    mailward: str
    postfix: str = "-"
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None  # None: no target on this row

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return self.target
        return f"{self.target} {'ok' if self.ok else 'BELOW'}"


@dataclass
class Notes:
    """Gathered while the benchmarks run, printed under the table."""

    fairness: list[str] = field(default_factory=list)  # how each side was set up
    problems: list[str] = field(default_factory=list)  # a figure is wrong (lost mail, errors)
    noise: list[str] = field(default_factory=list)  # a figure is suspect (other load on the machine)


def engine_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    messages = 20_000 if args.quick else args.messages
    figures = engine.main(["--messages", str(messages), "--size", str(args.size),
                           "--per-connection", str(args.per_connection)])
    target = f">= {engine.TARGET_MB_S:.0f} MB/s"
    return [Row("engine", f.name,
                f"{f.mb_per_s:,.1f} MB/s" + (f", {f.msgs_per_s:,.0f} msg/s" if f.messages > 1 else ""),
                target=target, ok=f.mb_per_s >= engine.TARGET_MB_S)
            for f in figures]


def _msgs(value: float) -> str:
    return f"{value:,.0f} msg/s"


def server_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    rows = server.compare(messages_small=server.QUICK_SMALL if args.quick else server.MESSAGES_SMALL,
                          messages_large=server.QUICK_LARGE if args.quick else server.MESSAGES_LARGE)
    print(server.format_table(rows), flush=True)
    notes.fairness.append(server.notes())
    out = []
    for r in rows:
        notes.problems += [f"server {r.label}: {p}" for p in r.problems]
        notes.noise += [f"server {r.label}: {w}" for w in r.warnings]
        out.append(Row("server", r.label, _msgs(r.mailward.msgs_per_s), _msgs(r.postfix.msgs_per_s),
                       r.ratio, ">= postfix", r.ratio >= 1.0 and not r.problems))
    return out


def outbound_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    rows = outbound.compare(messages=outbound.QUICK_MESSAGES if args.quick else outbound.MESSAGES)
    print(outbound.format_table(rows), flush=True)
    notes.fairness.append(outbound.NOTES)
    out = []
    for r in rows:
        notes.problems += [f"outbound {r.label}: {p}" for p in r.problems]
        out.append(Row("outbound", r.label, _msgs(r.mailward.msgs_per_s), _msgs(r.postfix.msgs_per_s),
                       r.ratio, ">= postfix", r.ratio >= 1.0 and not r.problems))
    return out


def dane_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    r = dane.compare(dane.QUICK_MESSAGES if args.quick else dane.MESSAGES)
    print(dane.format_row(r), flush=True)
    notes.fairness.append(dane.NOTES)
    notes.problems += [f"dane: {p}" for p in r.problems]
    notes.noise += [f"dane: {n}" for n in r.noise]
    # No Postfix here: the comparison is mailward at dane against mailward at may.
    return [Row("dane", r.label, f"{_msgs(r.dane.msgs_per_s)} (may {_msgs(r.may.msgs_per_s)})", "-",
                r.ratio, f">= {dane.TARGET:.2f} x may", r.ratio >= dane.TARGET and not r.problems)]


def idle_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    figures = idle.measure(idle.SESSIONS)
    mw, pf = figures.mailward, figures.postfix
    print(idle.report(mw, pf), flush=True)
    notes.fairness.append(idle.NOTES)
    if mw.errors:
        notes.problems.append(f"idle: {mw.requested - mw.sessions} sessions failed to open: {mw.errors}")
    ok = mw.sessions == mw.requested and mw.total_mib < idle.TARGET_MIB
    # Postfix's side is extrapolated from its process limit: one smtpd process per session.
    return [Row("idle", f"{mw.requested:,} idle TLS sessions on 465, memory", f"{mw.total_mib:,.0f} MiB RSS",
                f"{pf.pss_kib_per_session * mw.requested / 1024**2:,.1f} GiB PSS" if pf is not None else "-",
                None, f"< {idle.TARGET_MIB:,.0f} MiB", ok),
            Row("idle", "memory per idle TLS session", f"{mw.kib_per_session:,.1f} KiB",
                f"{pf.pss_kib_per_session:,.0f} KiB PSS" if pf is not None else "-")]


def soak_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    minutes = soak.QUICK_MINUTES if args.quick else args.soak_minutes
    r = soak.soak(minutes, soak.RATE, soak.default_interval(minutes))
    print(soak.report(r), flush=True)
    notes.problems += [f"soak: {p}" for p in r.problems]
    v = r.verdict
    case = f"{minutes:g} min at {soak.RATE:g} msg/s, second half"
    return [Row("soak", f"{case}: RSS trend", f"{v.rss_growth_kib / 1024:+.1f} MiB",
                target=f"<= {v.rss_limit_kib / 1024:.0f} MiB", ok=v.rss_growth_kib <= v.rss_limit_kib),
            Row("soak", f"{case}: open fds trend", f"{v.fd_growth:+.1f}", target=f"<= {soak.FD_GROWTH:.0f}",
                ok=v.fd_growth <= soak.FD_GROWTH),
            Row("soak", f"{case}: queue depth trend", f"{v.queue_growth:+.1f}",
                target=f"<= {soak.QUEUE_GROWTH:.0f}", ok=v.queue_growth <= soak.QUEUE_GROWTH)]


def postgres_rows(args: argparse.Namespace, notes: Notes) -> list[Row]:
    r = postgres.measure(args.quick)
    print(postgres.format_table(r), flush=True)
    notes.fairness.append(postgres.NOTES)
    notes.problems += [f"postgres: {p}" for p in r.problems]
    # No Postfix here: one node on PostgreSQL against one on SQLite, then k nodes against one.
    return [Row("postgres", f.label, _msgs(f.msgs_per_s), ratio=ratio, target=what)
            for f, ratio, what in r.rows()]


BENCHMARKS: dict[str, Callable[[argparse.Namespace, Notes], list[Row]]] = {
    "engine": engine_rows,
    "server": server_rows,
    "outbound": outbound_rows,
    "dane": dane_rows,
    "idle": idle_rows,
    "postgres": postgres_rows,
    "soak": soak_rows,
}


def format_table(rows: list[Row]) -> str:
    headers = ("benchmark", "case", "mailward", "postfix", "ratio", "target")
    cells = [(r.benchmark, r.case, r.mailward, r.postfix, f"{r.ratio:.2f}" if r.ratio is not None else "-",
              r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = (False, False, True, True, True, False)

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer messages everywhere (a check that everything runs, not figures)")
    parser.add_argument("--messages", type=int, default=100_000, help="engine: messages")
    parser.add_argument("--size", type=int, default=2048, help="engine: body octets per message")
    parser.add_argument("--per-connection", type=int, default=100, help="engine: messages per connection")
    parser.add_argument("--soak-minutes", type=float, default=soak.MINUTES, help="soak: length of the run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)

    started = time.monotonic()
    print(f"mailward bench{' (quick)' if args.quick else ''}: Python {platform.python_version()} on "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    rows: list[Row] = []
    notes = Notes()
    for name, bench in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"--- {name}", flush=True)
        rows += bench(args, notes)
    print()
    print(format_table(rows))
    if notes.fairness:
        print("\nHow the two sides were set up:")
        print("\n\n".join(notes.fairness))
    for title, items in (("PROBLEMS (these figures are wrong)", notes.problems),
                         ("Noise (other work on the machine during these rows)", notes.noise)):
        if items:
            print(f"\n{title}:")
            print("\n".join(f"* {p}" for p in items))
    targets = [r for r in rows if r.ok is not None]
    below = sum(1 for r in targets if not r.ok)
    print(f"\n{len(targets) - below} of {len(targets)} rows with a target meet it; "
          f"{time.monotonic() - started:.0f}s")
    # A figure below target is a finding, not a failure of the benchmark; lost or refused mail is.
    return 1 if notes.problems else 0


if __name__ == "__main__":
    sys.exit(main())
