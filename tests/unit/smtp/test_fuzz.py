"""Bounded atheris runs of the fuzz targets (fuzz/fuzz_server.py, fuzz/fuzz_client.py for the engine,
fuzz/fuzz_mtasts.py for the MTA-STS parsers, fuzz/fuzz_tlsrpt.py for the TLS-RPT record,
fuzz/fuzz_address.py for paths and domains, fuzz/fuzz_tlsa.py for TLSA rdata and DANE chain
matching, fuzz/fuzz_config.py for the configuration file).

Each target runs in its own process for MAILWARD_FUZZ_SECONDS (default 30; `make fuzz` uses 600)
on a temporary copy of its seed corpus, so the run never changes the repository. All targets start
together when the first of these tests runs, so the bounded run costs about MAILWARD_FUZZ_SECONDS
of wall time rather than that times the number of targets. Any crash, invariant violation, timeout
or out-of-memory report fails the test with the fuzzer's own output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
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


TARGETS = ["server", "client", "mtasts", "tlsrpt", "address", "tlsa", "config"]
Runs = dict[str, tuple[Path, "subprocess.Popen[str]"]]


def start_target(name: str, tmp_path: Path) -> subprocess.Popen[str]:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus" / name, corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable,
        str(ROOT / "fuzz" / f"fuzz_{name}.py"),
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=2048",
        # Seven targets share the cores (with whatever else runs): a unit may wait for CPU far
        # longer than it computes, so only a real hang should trip this.
        "-timeout=30",
        "-max_len=16384",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Every target started at once; each test then waits for its own."""
    runs: Runs = {}
    for name in TARGETS:
        where = tmp_path_factory.mktemp(f"fuzz_{name}")
        runs[name] = (where, start_target(name, where))
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


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
@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_target_finds_nothing(name: str, fuzz_runs: Runs,
                                   record_property: Callable[[str, object], None]) -> None:
    tmp_path, proc = fuzz_runs[name]
    output, _ = proc.communicate(timeout=SECONDS + GRACE)
    code = proc.returncode
    runs = executions(output)
    print(f"fuzz_{name}: {runs} executions in {SECONDS} s")
    failed = code != 0 or any(marker in output for marker in FAILURE_MARKERS)
    # For the summary: inputs tried, and how many the target got through without a finding.
    record_property("hostile", (f"fuzz_{name}: inputs in {SECONDS} s", runs, runs - int(failed)))
    if failed:
        crashes = sorted(str(p) for p in (tmp_path / "artifacts").iterdir())
        pytest.fail(f"fuzz_{name} exited {code}; reproduce with: python fuzz/fuzz_{name}.py "
                    f"{' '.join(crashes)}\n{report(output)}", pytrace=False)
    assert runs > 0, f"fuzz_{name} reported no executions:\n{output[-2000:]}"
