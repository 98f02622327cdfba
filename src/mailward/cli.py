"""Command-line entry point: `mailward serve | version`."""

from __future__ import annotations

import argparse
import sys

from mailward import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailward")
    parser.add_argument("--version", action="version", version=f"mailward {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("version")
    serve = sub.add_parser("serve")
    serve.add_argument("--demo", action="store_true")
    args = parser.parse_args(argv)
    print(f"mailward {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
