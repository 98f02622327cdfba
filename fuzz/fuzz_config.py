"""Fuzz the configuration loader (config.py) with arbitrary TOML text.

Input: the file's bytes. Whatever an operator writes, mailward must either start with a validated
Config or refuse with one ConfigError sentence saying what to fix; a traceback instead of that
sentence is the bug this looks for.

Invariants: load_config raises nothing but ConfigError; its message is one non-empty line; a
loaded Config has at least one listener or the defaults, and loading the same file twice gives
equal results.

Run: python fuzz/fuzz_config.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mailward"]):
    from mailward.config import ConfigError, load_config

# One file, rewritten for each input; relative paths in it resolve under this directory.
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
_FILE = _DIR / "mailward.toml"


def _load() -> object:
    try:
        return load_config(_FILE)
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and message.isprintable(), repr(message)
        return ("error", message)


def TestOneInput(data: bytes) -> None:
    _FILE.write_bytes(data)
    first = _load()
    assert _load() == first, "the same file loaded twice differently"


def main() -> None:
    os.chdir(_DIR)  # the default state_dir and certificate paths stay inside the scratch directory
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
