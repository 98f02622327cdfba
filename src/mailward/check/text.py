"""The terminal form of a check report: lines of rich markup, most important first.
"""

from __future__ import annotations

from typing import Any

# --- the exit status and the text form ------------------------------------------------------------------


_VERDICT_STYLE = {"secure": "bold green", "insecure": "bold yellow", "defer": "bold red", "error": "bold red"}
_HOST_STYLE = {"Verified": "green", "Trusted": "yellow", "Untrusted": "yellow", "Plaintext": "red",
               "Unreachable": "red"}
_SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def render(report: dict[str, Any]) -> list[str]:
    """The report as lines of rich markup, most important first."""
    from rich.markup import escape as e

    verdict = report["verdict"]
    lines = [f"[bold]{e(report['domain'])}[/]: [{_VERDICT_STYLE[verdict]}]{verdict.upper()}[/]",
             f"  {e(report['reason'])}"]
    kind = report["kind"]
    if kind == "mx":
        lines.append(f"level [bold]{e(report['level'])}[/] ({e(report['level_source'])})")
        dns = report["dns"]
        if dns.get("consulted"):
            trust = ("DNSSEC trusted" if dns.get("dnssec_trusted")
                     else "DNSSEC not trusted: resolver off loopback")
            lines.append(f"DNS via {e(dns.get('resolvers', ''))} ({trust})")
            mx = dns.get("mx")
            if mx is not None:
                what = ("Null MX" if mx["null_mx"] else "none: the domain itself" if mx["implicit"]
                        else "MX records")
                lines.append(f"  {what}: {_status(mx['status'])}")
        else:
            lines.append(f"DNS not consulted: {e(str(dns.get('reason', '')))}")
        sts = report["mta_sts"]
        if not sts["consulted"]:
            lines.append(f"MTA-STS: not consulted ({e(sts['reason'])})")
        elif sts["policy"] is None:
            lines.append("MTA-STS: " + e(f"no policy ({sts['failure']}: {sts['detail']})" if sts["failure"]
                                          else "no policy published"))
        else:
            p = sts["policy"]
            lines.append(f"MTA-STS: mode [bold]{p['mode']}[/], mx {e(', '.join(p['mx']))}, "
                         f"max_age {p['max_age']}"
                         + (" (cached)" if sts["from_cache"] else ""))
        rpt = report["tlsrpt"]
        if rpt is not None:
            lines.append("TLS-RPT: " + e(", ".join(rpt["rua"]) if not rpt["error"]
                                         else f"none ({rpt['error']})"))
    # Hosts found by an MX lookup carry their preference; a submission server, our own name or an
    # explicit next hop is just a host.
    by_mx = kind == "mx" and report.get("destination", {}).get("next_hop") is None
    for host in report["mx"]:
        lines.extend(_render_host(host, by_mx))
    if kind == "self":
        for cert in report["certificates"]:
            c = cert["certificate"]
            lines.append(f"[bold]{e(cert['cert'])}[/]: {e(c.get('subject', ''))}, {e(c.get('key', ''))}, "
                         f"until {e(c.get('not_after', '')[:10])}")
            for n in cert["names"]:
                now = {True: "[green]matches now[/]", False: "[red]matches nothing now[/]",
                       None: "no usable records"}[n["current_matches"]]
                nxt = {True: ", [green]next key published[/]", False: ", [red]next key not published[/]",
                       None: ""}[n["next_matches"]]
                lines.append(f"  {e(n['owner'])} {_status(n['status'])}: {now}{nxt}")
                lines.extend(f"      {e(_record_text(r))}" for r in n["records"])
    if report["findings"]:
        lines.append("[bold]Findings[/]")
        for f in report["findings"]:
            where = f"{f['host']}: " if f["host"] else ""
            lines.append(f"  [{_SEVERITY_STYLE[f['severity']]}]{f['severity']}[/] {e(where + f['text'])}")
    return lines


def _status(status: str) -> str:
    style = {"secure": "green", "insecure": "yellow"}.get(status, "red")
    return f"[{style}]{status}[/]"


def _record_text(r: dict[str, Any]) -> str:
    data = r["data"] if len(r["data"]) <= 24 else r["data"][:24] + "..."
    state = "usable" if r["usable"] and not r["ignored"] else f"not used: {r['why_unusable'] or r['ignored']}"
    matched = f", matches certificate {', '.join(str(m) for m in r['matches'])}" if r.get("matches") else ""
    return f"{r['usage']} {r['selector']} {r['matching_type']} {data} ({r['meaning']}; {state}{matched})"


def _render_host(host: dict[str, Any], by_mx: bool) -> list[str]:
    from rich.markup import escape as e

    verdict = host.get("verdict", "Unreachable")
    label = f"MX {host['preference']} {e(host['name'])}" if by_mx else f"host {e(host['name'])}"
    lines = [f"[bold]{label}[/]: [{_HOST_STYLE[verdict]}]{verdict}[/]"]
    if not any(c["accepted"] for c in host.get("connections", [])):
        lines.append(f"  {e(str(host.get('reason', '')))}")
    if "dnssec" in host:
        lines.append(f"  addresses {e(', '.join(host['addresses']) or 'none')} ({_status(host['dnssec'])})")
    tlsa = host.get("tlsa")
    if tlsa is not None:
        lines.append(f"  TLSA {e(tlsa.get('owner', ''))} {_status(tlsa['status'])}"
                     + ("" if tlsa["records"] else ": none"))
        lines.extend(f"      {e(_record_text(r))}" for r in tlsa["records"])
    elif host.get("tlsa_skipped"):
        lines.append(f"  TLSA not used: {e(host['tlsa_skipped'])}")
    if host.get("mta_sts_match") is not None:
        lines.append("  MTA-STS pattern: " + ("[green]matches[/]" if host["mta_sts_match"]
                                               else "[red]no match[/]"))
    for c in host.get("connections", []):
        lines.append(f"  {e(c['relay'])}: " + ("connected" if c["connected"] else "[red]no session[/]")
                     + (f", {e(c['banner'])}" if c["banner"] else ""))
        if c["ehlo"] is not None:
            lines.append(f"      EHLO: {e(' '.join(k.split()[0] for k in c['ehlo']))}")
        if c["ehlo_tls"] is not None:
            lines.append(f"      EHLO after TLS: {e(' '.join(k.split()[0] for k in c['ehlo_tls']))}")
        if c["tls"] is not None:
            t = c["tls"]
            group = f", group {t['group']}" if t["group"] else ""
            lines.append(f"      TLS: {e(t['protocol'])} {e(t['cipher'])} ({t['bits']} bits{group})")
        records = (host.get("tlsa") or {}).get("records", [])
        for cert in c["certificates"]:
            named = [records[i] for i in cert["tlsa_matches"] if i < len(records)]
            match = ("; matches TLSA " + ", ".join(f"{r['usage']} {r['selector']} {r['matching_type']}"
                                                    for r in named)) if named else ""
            if "error" in cert:
                lines.append(f"      certificate {cert['depth']}: {e(cert['error'])}")
                continue
            expired = " [red]expired[/]" if cert["expired"] else ""
            lines.append(f"      certificate {cert['depth']}: {e(cert['subject'])}; "
                         f"issuer {e(cert['issuer'])}")
            lines.append(f"        names {e(', '.join(cert['names']) or 'none')}; {e(cert['key'])}; "
                         f"{cert['not_before'][:10]} to {cert['not_after'][:10]}{expired}{e(match)}")
        if c["pkix"] is not None:
            p = c["pkix"]
            lines.append(f"      PKIX: {'trusted' if p['trusted'] else 'not trusted'}, name "
                         f"{e(p['reference_name'])} {'matches' if p['name_matches'] else 'does not match'}")
        if c["dane"] is not None:
            d = c["dane"]
            state = "[green]verified[/]" if d["verified"] else "[red]failed[/]"
            lines.append(f"      DANE: {state}: {e(d['reason'])}")
        style = _HOST_STYLE[c["verdict"]]
        if c["accepted"]:  # delivery's own summary starts with the verdict word ("plaintext" aside)
            lines.append(f"      -> [{style}]{e(str(c['outcome']))}[/]")
        else:
            lines.append(f"      -> [{style}]{c['verdict']}[/], not used: {e(str(c['error']))}")
    return lines


