"""``arrag`` in a subprocess, as a user meets it: interrupted by Ctrl-C at work, or with a package missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence


def ctrl_c(argv: Sequence[str], ready: Callable[[str], bool], env: dict | None = None) -> tuple[int, str]:
    """Run ``arrag *argv`` and send it SIGINT (a terminal's Ctrl-C) once ``ready(its stderr so far)``; returns its
    exit status and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "arrag", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := os.read(process.stderr.fileno(), 1 << 16):
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not ready(b"".join(chunks).decode(errors="replace")) and process.poll() is None:
        assert time.monotonic() < deadline, "the command never got to work"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=10)
    return process.returncode, b"".join(chunks).decode()


def without(modules: Sequence[str], argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Run ``arrag *argv`` where ``modules`` do not import, as if they were not installed."""
    code = (
        f"import sys\nfor name in {list(modules)!r}:\n    sys.modules[name] = None\n"
        f"from arrag.cli import main\nsys.exit(main({list(argv)!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
