"""`mailward check`: a domain's mail transport security at a glance, with the verdict mailward's own
delivery would reach.

This package owns the diagnosis and its presentation, never a policy of its own. The plan comes
from `policytool.survey` (the Deliverer's `destination_for`, DNS lookups, `lookup_tlsa`, MTA-STS
through `mtasts.sts_facts` and `policy.plan`); every connection is `attempt.Session.open` with the
planned `Candidate`, so STARTTLS, the handshake and the DANE or PKIX judgement are delivery's. A
probe says EHLO, STARTTLS, EHLO and QUIT, and never MAIL. What is added here is description: the
decoded TLSA records, the certificate chain and which record matched which certificate, and the
common mistakes called out by name (a key rollover without a new TLSA record, a DANE-TA chain
without its anchor, TLSA records nobody may use, MTA-STS patterns that miss an MX host).

Three forms: `check DOMAIN` (MX delivery, or the route or smarthost that takes the domain;
domain.py), `check --host H --port 465|587` (a submission server; submission.py) and
`check --self` (this server's certificates against the TLSA records published for its names;
selfcheck.py). parts.py holds the probe and the description of records and certificates, text.py
the terminal form. The JSON schema and the exit status are documented in docs/check.md:
0 secure, 1 insecure but deliverable, 2 would defer, 3 the check could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mailward import policytool
from mailward.check.domain import check_domain, recording_sts
from mailward.check.parts import EXIT_STATUS, SCHEMA, CheckError, probe
from mailward.check.selfcheck import check_self
from mailward.check.submission import check_submission
from mailward.check.text import render
from mailward.config import Config, ConfigError, load_config
from mailward.delivery.dns import DnsResolver

__all__ = ["EXIT_STATUS", "CheckError", "check_domain", "check_self", "check_submission", "exit_status",
           "probe", "render", "run"]



def exit_status(report: dict[str, Any]) -> int:
    return EXIT_STATUS[report["verdict"]]


# --- the command ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # Delivery's parts log what they meet (a failed MTA-STS fetch, an off-loopback resolver); the
    # report names all of it, so those lines would only repeat it on stderr.
    logger = logging.getLogger("mailward")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        config = load_config(Path(args.config) if args.config else None)
        report = asyncio.run(_run(args, config))
    except (CheckError, ConfigError) as exc:
        if args.json:
            kind = "self" if args.self_check else "submission" if args.host or args.port else "mx"
            print(json.dumps({"schema": SCHEMA, "kind": kind, "domain": args.domain or args.host,
                              "verdict": "error", "reason": str(exc), "mx": [], "findings": []}, indent=2))
        else:
            print(f"mailward: {exc}", file=sys.stderr)
        return EXIT_STATUS["error"]
    finally:
        logger.setLevel(level)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)
        for line in render(report):
            console.print(line)
    return exit_status(report)


async def _run(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    resolver = DnsResolver(config.dns.resolvers, timeout=config.dns.timeout)
    if args.self_check:
        if args.domain or args.host:
            raise CheckError("--self checks this server's own names; give neither DOMAIN nor --host.")
        return await check_self(config, resolver, port=args.port or 25)
    if args.host is not None or args.port is not None:
        tls = getattr(args, "tls", None) or {465: "implicit", 587: "starttls"}.get(args.port)
        if args.host is None or args.port is None or tls is None or args.domain:
            raise CheckError("a submission check needs --host H and --port 465 (implicit TLS) or 587 "
                             "(STARTTLS), or another port with --tls implicit|starttls, and no DOMAIN.")
        ca_file = Path(args.ca_file) if args.ca_file else None
        return await check_submission(args.host, args.port, config, resolver, ca_file=ca_file,
                                      implicit=tls == "implicit")
    if not args.domain:
        raise CheckError("give a DOMAIN to check (or --host H --port 465|587, or --self).")
    try:
        domain = policytool.normalise_domain(args.domain)
    except policytool.PolicyToolError as exc:
        raise CheckError(str(exc)) from None
    return await check_domain(domain, config, resolver, mta_sts=recording_sts(config, resolver))
