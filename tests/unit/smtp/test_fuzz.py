"""Bounded atheris runs of the fuzz targets (fuzz/fuzz_server.py, fuzz/fuzz_client.py for the engine,
fuzz/fuzz_mtasts.py for the MTA-STS parsers, fuzz/fuzz_tlsrpt.py for the TLS-RPT record).

Each target runs in its own process for MAILWARD_FUZZ_SECONDS (default 30; `make fuzz` uses 600)
on a temporary copy of its seed corpus, so the run never changes the repository. Any crash,
invariant violation, timeout or out-of-memory report fails the test with the fuzzer's own output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[3]
SECONDS = int(os.environ.get("MAILWARD_FUZZ_SECONDS", "30"))
# Start-up, corpus loading and the final minimisation of a crash come on top of the run itself.
GRACE = 120
FAILURE_MARKERS = (
    "==ERROR", "ERROR: libFuzzer", "Uncaught Python exception", "Timeout", "libFuzzer: timeout",
    "out-of-memory",
)
_DONE = re.compile(r"^#(\d+)\s+DONE", re.MULTILINE)
_UNITS = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.MULTILINE)


def run_target(name: str, tmp_path: Path) -> tuple[int, str]:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus" / name, corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable,
        str(ROOT / "fuzz" / f"fuzz_{name}.py"),
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=2048",
        "-timeout=10",
        "-max_len=16384",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          errors="replace", timeout=SECONDS + GRACE)
    return proc.returncode, proc.stdout + proc.stderr


def executions(output: str) -> int:
    for pattern in (_UNITS, _DONE):
        found = pattern.findall(output)
        if found:
            return int(found[-1])
    return 0


def report(output: str) -> str:
    """The Python traceback and the input as Base64, without the progress lines."""
    start = output.find("=== Uncaught Python exception")
    if start < 0:
        start = max(output.find("==ERROR"), 0)
    keep = [line for line in output[start:].splitlines()
            if not line.startswith(("#", "0x", "INFO:", "MS:")) and len(line) < 500]
    base64 = [line[:2000] for line in output.splitlines() if line.startswith("Base64:")]
    return "\n".join(keep[:60] + base64)


@pytest.mark.fuzz
@pytest.mark.timeout(SECONDS + 2 * GRACE)
@pytest.mark.parametrize("name", ["server", "client", "mtasts", "tlsrpt"])
def test_fuzz_target_finds_nothing(name: str, tmp_path: Path) -> None:
    code, output = run_target(name, tmp_path)
    runs = executions(output)
    print(f"fuzz_{name}: {runs} executions in {SECONDS} s")
    failed = code != 0 or any(marker in output for marker in FAILURE_MARKERS)
    if failed:
        crashes = sorted(str(p) for p in (tmp_path / "artifacts").iterdir())
        pytest.fail(f"fuzz_{name} exited {code}; reproduce with: python fuzz/fuzz_{name}.py "
                    f"{' '.join(crashes)}\n{report(output)}", pytrace=False)
    assert runs > 0, f"fuzz_{name} reported no executions:\n{output[-2000:]}"
