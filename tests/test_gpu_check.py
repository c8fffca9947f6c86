"""benchmarks/gpu_check.sh without a GPU: it parses, keeps caches and scratch out of $OUT (a
100 MB model cache there would crowd out the results), and its dry run is documented. The dry
run itself (`bash benchmarks/gpu_check.sh --dry-run`, ~5 min on cuda-emu:0) is not part of the
default test run."""

import pathlib
import re
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    done = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_caches_and_scratch_stay_out_of_out():
    text = SCRIPT.read_text()
    assert re.search(r"SCRATCH=\$\(mktemp -d /tmp/", text)
    for var in ("OFFLOAD_CACHE", "CUPY_CACHE_DIR", "TMPDIR"):
        m = re.search(rf"\b{var}=(\S+)", text)
        assert m and m.group(1).startswith("$SCRATCH"), f"{var} must live under $SCRATCH"
    assert "--basetemp=\"$SCRATCH" in text
    # what goes to $OUT: the log, the bundle, the benchmark's three files
    writes = set(re.findall(r'"\$OUT/([\w.-]+)"', text))
    assert writes <= {"gpu_check.log", "logs.tgz", ".logs.tgz"}, writes
