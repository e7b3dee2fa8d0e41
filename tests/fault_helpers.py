"""Faults injected into a command run in a subprocess (a full disk, simulated without
root by a file size limit)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli_with_file_size_limit(
    limit: int, *argv: str, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``unilora ARGV`` in a process whose files cannot grow past ``limit`` bytes: every
    write past it fails (EFBIG), as on a full disk."""
    pytest.importorskip("resource")
    code = (
        "import resource, signal, sys\n"
        "from unilora_rs.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
