"""benchmarks/bench_batcher.py runs end to end on a few requests and writes its .md and .json."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_batcher_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batcher.py"),
                          "--requests", "80", "--threads", "4", "--repeats", "1",
                          "--max-delay-us", "100", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [doc] = [json.loads(p.read_text()) for p in tmp_path.glob("batcher-*.json")]
    assert {(r["way"], r["model"]) for r in doc["rows"]} == {
        (w, m) for w in ("submit+await", "threads", "alone") for m in ("unbatched", "batched")}
    assert all(r["cpu_us_per_request"] > 0 and r["requests_per_s"] > 0 for r in doc["rows"])
    assert list(tmp_path.glob("batcher-*.md"))
