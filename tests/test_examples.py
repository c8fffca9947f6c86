"""The examples run as documented."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_acquire_produce_example():
    done = subprocess.run([sys.executable, str(EXAMPLES / "acquire_produce.py"), "--threads", "8",
                           "--events", "64"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "64 events on 8 threads" in done.stdout and "device runs" in done.stdout
