"""Command-line entry point: mailward serve | reload | config check | user ... | queue ... | sendmail |
tlsa | policy show | version."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys
import warnings
from pathlib import Path

from mailward import __version__, queuetool, tlsrpttool
from mailward.auth import UserStore, UserStoreError
from mailward.config import Config, ConfigError, describe, load_config


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if args.config else None
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from mailward.service import demo_banner, prepare_demo, run_service

    if args.demo:
        config, password = prepare_demo(Path(args.state_dir))
        return run_service(_log_format(config, args), demo_banner(config, password), demo=True)
    return run_service(_log_format(_config(args), args))


def _log_format(config: Config, args: argparse.Namespace) -> Config:
    """--log-format overrides log.format, e.g. JSON for one run under a log collector."""
    if args.log_format is None:
        return config
    return dataclasses.replace(config, log=dataclasses.replace(config.log, format=args.log_format))


def cmd_reload(args: argparse.Namespace) -> int:
    from mailward.service import send_reload

    return send_reload(_config(args))


def cmd_config_check(args: argparse.Namespace) -> int:
    from mailward.config import check_files

    config = _config(args)
    check_files(config)
    print(describe(config))
    print("# configuration is valid", file=sys.stderr)
    return 0


def _users(args: argparse.Namespace) -> UserStore:
    return UserStore(_config(args).auth.users_file)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    else:
        try:
            with warnings.catch_warnings():
                # Without a terminal getpass would warn, then echo the password or hit EOF.
                warnings.simplefilter("error", getpass.GetPassWarning)
                pw = getpass.getpass("Password: ")
                again = getpass.getpass("Again: ")
        except (EOFError, getpass.GetPassWarning):
            raise UserStoreError("no password was given: there is no terminal to ask on (or input "
                                 "ended); pass --password-stdin and write it to standard input.") from None
        if again != pw:
            raise UserStoreError("the two passwords differ; run the command again.")
    if len(pw) < 8:
        raise UserStoreError("the password is shorter than 8 characters; choose a longer one.")
    return pw


def cmd_user(args: argparse.Namespace) -> int:
    users = _users(args)
    if args.user_command == "add":
        users.add(args.name, _password(args), args.address or ())
        print(f"user {args.name} added")
    elif args.user_command == "passwd":
        users.set_password(args.name, _password(args))
        print(f"password of {args.name} changed")
    elif args.user_command == "del":
        users.delete(args.name)
        print(f"user {args.name} deleted")
    else:
        for rec in users.list():
            print(f"{rec.name}\t{','.join(rec.addresses) or rec.name}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    config = _config(args)
    # The pid file `mailward serve` writes, so retry and flush can say whether a server will act.
    server = queuetool.Server(config.state_dir / "mailward.pid", config.delivery.enabled)
    if args.queue_command in ("migrate", "export", "import"):
        from mailward.queue import postgres_tool

        return postgres_tool.run(args, config)
    return queuetool.run(args, config.queue.path, server=server, url=config.queue.postgres_url)


def cmd_tlsrpt(args: argparse.Namespace) -> int:
    return tlsrpttool.run(args, _config(args))


def cmd_policy(args: argparse.Namespace) -> int:
    from mailward import policytool  # DNS libraries: loaded only when asked

    return policytool.run(args, _config(args))


def cmd_check(args: argparse.Namespace) -> int:
    from mailward import check  # DNS, TLS and rich: loaded only when asked

    return check.run(args)


def cmd_tlsa(args: argparse.Namespace) -> int:
    """Print the TLSA record that publishes a certificate for DANE (RFC 7671 §5 recommends 3 1 1)."""
    from cryptography import x509

    from mailward.delivery.dane import association_data

    path = Path(args.cert)
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        print(f"mailward: cannot read {path} ({exc.strerror}); give the certificate file a listener "
              "uses, such as certbot's fullchain.pem.", file=sys.stderr)
        return 2
    except ValueError:
        print(f"mailward: {path} holds no PEM certificate; give a PEM file such as certbot's "
              "fullchain.pem.", file=sys.stderr)
        return 2
    if args.usage == 2 and len(certs) < 2:
        print(f"mailward: {path} holds only one certificate; a DANE-TA (usage 2) record names the "
              "issuing CA, so give the full chain (certbot's fullchain.pem).", file=sys.stderr)
        return 2
    # DANE-EE names the leaf; DANE-TA the top of the chain the server sends (RFC 7672 §3.1.2).
    cert = certs[0] if args.usage == 3 else certs[-1]
    host = args.host
    if host is None:
        try:
            san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        host = names[0] if names else "HOST"
    data = association_data(cert, args.selector, args.mtype).hex()
    print(f"_{args.port}._tcp.{host.rstrip('.')}. IN TLSA {args.usage} {args.selector} {args.mtype} {data}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailward", description="A mail transfer agent that "
                                     "delivers securely or not at all.")
    parser.add_argument("--version", action="version", version=f"mailward {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE",
                        help="configuration file (default: $MAILWARD_CONFIG, then ./mailward.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the mail server")
    serve.add_argument("--demo", action="store_true",
                       help="run the embedded default: loopback listeners, demo certificate and user")
    serve.add_argument("--state-dir", default="var", help="state directory for --demo (default: var)")
    serve.add_argument("--log-format", choices=("human", "json"),
                       help="log line format, overriding log.format: human text or one JSON object per line")
    serve.set_defaults(func=cmd_serve)

    reload = sub.add_parser("reload", parents=[common], help="reload certificates (SIGHUP)")
    reload.set_defaults(func=cmd_reload)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", parents=[common], help="validate and print effective values")
    check.set_defaults(func=cmd_config_check)

    user = sub.add_parser("user", help="manage AUTH users")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    for name, helptext in (("add", "add a user"), ("passwd", "change a password")):
        p = user_sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "add":
            p.add_argument("--address", action="append",
                           help="an address the user may send as (repeatable; @domain for any)")
        p.set_defaults(func=cmd_user)
    p = user_sub.add_parser("del", parents=[common], help="delete a user")
    p.add_argument("name")
    p.set_defaults(func=cmd_user)
    p = user_sub.add_parser("list", parents=[common], help="list users")
    p.set_defaults(func=cmd_user)

    queuetool.add_parser(sub, common, cmd_queue)
    tlsrpttool.add_parser(sub, common, cmd_tlsrpt)
    # Listed for --help only: main() hands `sendmail` its arguments before argparse sees them.
    sub.add_parser("sendmail", help="submit a message read from standard input, like sendmail(8); "
                   "see mailward sendmail --help", add_help=False)

    tlsa = sub.add_parser("tlsa", help="print the TLSA record to publish for a certificate (DANE)")
    tlsa.add_argument("--cert", required=True, metavar="FILE", help="PEM certificate or chain, leaf first")
    tlsa.add_argument("--usage", type=int, choices=(2, 3), default=3,
                      help="3 DANE-EE (the leaf, default) or 2 DANE-TA (the last certificate of the chain)")
    tlsa.add_argument("--selector", type=int, choices=(0, 1), default=1,
                      help="1 the public key (default, survives renewals with the same key) or 0 the whole "
                      "certificate")
    tlsa.add_argument("--mtype", type=int, choices=(0, 1, 2), default=1,
                      help="1 SHA-256 (default), 2 SHA-512, 0 the full data")
    tlsa.add_argument("--host", help="the MX host name (default: the certificate's first DNS name)")
    tlsa.add_argument("--port", type=int, default=25, help="the port (default 25)")
    tlsa.set_defaults(func=cmd_tlsa)

    policy = sub.add_parser("policy", help="outbound TLS security levels")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    show = policy_sub.add_parser(
        "show", parents=[common], help="the TLS level for a domain, why, and what DNS makes of it now",
        description="Prints where mail for DOMAIN goes, its TLS security level and the configuration that "
                    "sets it; then asks DNS for the MX, address and TLSA records and prints the TLS each "
                    "host would be held to. No mail host is contacted.")
    show.add_argument("domain", metavar="DOMAIN", help="recipient domain (or an address, or [IP])")
    show.add_argument("--json", action="store_true",
                      help="print one JSON object (schema: pydoc mailward.policytool)")
    show.add_argument("--no-dns", action="store_true", help="print the configured part only")
    show.set_defaults(func=cmd_policy)

    check = sub.add_parser(
        "check", parents=[common], help="a domain's mail transport security, as delivery would find it",
        description="Looks up and connects to the mail hosts of DOMAIN as delivery would (EHLO, STARTTLS, "
                    "EHLO, QUIT; never MAIL) and reports DNSSEC, DANE, MTA-STS, TLS-RPT, each host's TLS and "
                    "the verdict. Exit status: 0 secure, 1 insecure, 2 would defer, 3 could not check.")
    check.add_argument("domain", nargs="?", metavar="DOMAIN", help="recipient domain (or an address)")
    check.add_argument("--json", action="store_true", help="one JSON object (schema: docs/check.md)")
    check.add_argument("--host", help="with --port 465 or 587: a submission server to check instead")
    check.add_argument("--port", type=int, help="465 or 587 with --host (another port with --tls); with "
                       "--self the TLSA port (25)")
    check.add_argument("--tls", choices=("implicit", "starttls"),
                       help="with --host: how the port speaks TLS (default: implicit on 465, STARTTLS on "
                            "587)")
    check.add_argument("--ca-file", metavar="FILE", help="with --host: PEM CA certificates to trust")
    check.add_argument("--self", dest="self_check", action="store_true",
                       help="compare this server's certificates with the TLSA records of its names")
    check.set_defaults(func=cmd_check)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args: print(f"mailward {__version__}") or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        # sendmail(8) options (-oi, -bm, -FName, -f addr) are getopt-shaped, not argparse-shaped.
        from mailward.sendmail import main as sendmail_main

        return sendmail_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (ConfigError, UserStoreError) as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
