"""The skip summary of tests/conftest.py: skips grouped by reason at the end of a run, and the
per-test list with -rs / -ra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest

@pytest.mark.parametrize("k", range(3))
def test_absent(k):
    pytest.skip("gpu:0 unavailable: no driver")

def test_other():
    pytest.skip("needs nvcc")

def test_runs():
    assert True
'''


def _pytest(folder: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args,
                           str(folder / "test_skipping.py")], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_skips_grouped_by_reason_and_per_test_on_demand(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the root, no -ra
    out = _pytest(tmp_path, "-q")
    assert "4 skipped, by reason (per test: -rs)" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["3", "gpu:0", "unavailable:", "no", "driver"] in lines
    assert ["1", "needs", "nvcc"] in lines
    assert "SKIPPED [" not in out  # no per-test list by default
    for flag in ("-rs", "-ra"):
        out = _pytest(tmp_path, "-q", flag)
        assert "SKIPPED [3]" in out and "needs nvcc" in out
        assert "skipped, by reason" not in out
