"""`mailward tlsrpt show`: the TLS reports (RFC 8460) the daily run would send, from the queue store.

It reads the tallies through the queue tool's read-only connection (`queuetool.QueueFile`) beside a
running server, or from a shared PostgreSQL queue (`queue.postgres_tool.SharedQueue`), and builds
each report with `reports.tlsrpt.build_report`, exactly as the sender does. Nothing is looked up in
DNS and nothing is sent.

`--json` prints a list, one object per domain::

    [{"domain": "example.org",
      "sent": "2026-11-28.3f...@mx.example.net",  # the report id when it went out, else null
      "report": {...}}]                           # the RFC 8460 §4 report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from mailward.config import Config
from mailward.queue import TlsRptTally
from mailward.queue.postgres_tool import SharedQueue, ToolError
from mailward.queuetool import EXIT_OK, EXIT_SETUP, QueueFile, QueueToolError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """Register `tlsrpt show` on the `mailward` parser."""
    tlsrpt = sub.add_parser("tlsrpt", help="SMTP TLS reports (RFC 8460) about outbound TLS")
    tlsrpt_sub = tlsrpt.add_subparsers(dest="tlsrpt_command", required=True)
    show = tlsrpt_sub.add_parser(
        "show", parents=[common], help="the reports for a day, as they would be sent",
        description="Prints, per recipient domain, the TLS report built from the sessions counted on one "
                    "UTC day, and whether it was sent. Reads the queue only: no DNS, no sending.")
    show.add_argument("--date", metavar="YYYY-MM-DD",
                      help="the UTC day (default: yesterday, the day the next daily run reports)")
    show.add_argument("--domain", metavar="DOMAIN", help="only this recipient domain")
    show.add_argument("--json", action="store_true",
                      help="print a JSON list (schema: pydoc mailward.tlsrpttool)")
    show.set_defaults(func=func)


def _read(config: Config, day: str, domain: str | None) -> tuple[list[TlsRptTally], dict[str, str]]:
    """The day's tallies and sent reports, from the SQLite file or the shared PostgreSQL queue."""
    url = config.queue.postgres_url
    if url is None:
        return QueueFile(config.queue.path).tlsrpt(day, domain)
    shared = SharedQueue(url)
    try:
        return shared.tlsrpt(day, domain)
    finally:
        shared.close()


def run(args: argparse.Namespace, config: Config, now: float | None = None) -> int:
    from mailward.reports.tlsrpt import build_report, report_id

    clock = time.time() if now is None else now
    if args.date is None:
        day = (datetime.fromtimestamp(clock, UTC).date() - timedelta(days=1)).isoformat()
    else:
        try:
            day = date.fromisoformat(args.date).isoformat()
        except ValueError:
            print(f"mailward: --date {args.date!r} is not a day; write it as YYYY-MM-DD.", file=sys.stderr)
            return EXIT_SETUP
    domain = None if args.domain is None else args.domain.lower().rstrip(".")
    try:
        tallies, sent = _read(config, day, domain)
    except (QueueToolError, ToolError) as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return EXIT_SETUP
    cfg = config.tlsrpt
    reports = [
        (d, sent.get(d), build_report(d, day, tallies, organization=cfg.organization, contact=cfg.contact,
                                      report_id=report_id(day, d, config.hostname)))
        for d in sorted({t.domain for t in tallies})]
    if args.json:
        print(json.dumps([{"domain": d, "sent": s or None, "report": r} for d, s, r in reports], indent=2))
        return EXIT_OK
    if not reports:
        print(f"no TLS sessions counted on {day} (UTC)" + (f" for {domain}" if domain else ""))
        return EXIT_OK
    for d, s, report in reports:
        state = "sent" if s else "not wanted (no valid _smtp._tls record)" if s == "" else "not sent yet"
        print(f"{d}  {day}  report-id {report['report-id']}  {state}")
        for entry in report["policies"]:
            policy, summary = entry["policy"], entry["summary"]
            hosts = ", ".join(policy.get("mx-host", [])) or "-"
            print(f"  {policy['policy-type']:<16} mx {hosts}: {summary['total-successful-session-count']} "
                  f"successful, {summary['total-failure-session-count']} failed")
            for f in entry.get("failure-details", []):
                where = f.get("receiving-mx-hostname", "")
                if "receiving-ip" in f:
                    where += f"[{f['receiving-ip']}]"
                reason = f.get("failure-reason-code", "")
                print(f"    {f['failed-session-count']:>5} {f['result-type']} {where}".rstrip()
                      + (f": {reason}" if reason else ""))
    return EXIT_OK
