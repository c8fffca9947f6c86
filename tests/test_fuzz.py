"""The fuzzer (issue 15): seeded mutants of the zoo models and built graphs, each loaded and
called in a worker subprocess (tests/fuzz_mutations.py) on each device of the matrix, with
onnxruntime as the differential oracle.

Fails on any crash (the worker dies), hang (no answer within PER_MUTANT_S), exception that is not
an OffloadError, numbers for a model onnxruntime refuses, or outputs that differ from
onnxruntime's. The default run is short (DEFAULT_MUTANTS per device, one fixed seed); a long
run: ``pytest tests/test_fuzz.py --fuzz-mutants=20000 --fuzz-seed=7`` (or the environment
variables OFFLOAD_FUZZ_MUTANTS / OFFLOAD_FUZZ_SEED). A failure prints the mutant's numbers;
``python tests/fuzz_mutations.py --repro SEED_MODEL SEED INDEX --device D`` reproduces it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

import fuzz_mutations

pytest.importorskip("onnxruntime")

DEFAULT_MUTANTS = 1000
PER_MUTANT_S = 30.0  # generous: a first OpenCL kernel build on a loaded 2-core machine
STARTUP_S = 120.0
ADDRESS_SPACE = 6 << 30  # RLIMIT_AS of a worker: a memory bomb fails there, not on the machine
WORKER = Path(fuzz_mutations.__file__)


def _cap():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_mutants(device: str, jobs: list, seed: int) -> list[dict]:
    """Run ``jobs`` ((seed model, index) pairs) in worker processes, restarted after a crash or
    a hang; one result per job, crashes and hangs included."""
    results, pending, retried = [], list(jobs), set()
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    while pending:
        with tempfile.TemporaryFile() as stderr, tempfile.TemporaryFile("w+") as todo:
            todo.write("".join(f"{name} {i}\n" for name, i in pending))
            todo.seek(0)  # a file, not a pipe: the worker reads its jobs at its own pace
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), "--worker", "--device", device, "--seed",
                 str(seed)], stdin=todo, stdout=subprocess.PIPE, stderr=stderr,
                preexec_fn=_cap, env=env, text=True, bufsize=1)
            started, limit = False, STARTUP_S
            while pending:
                ready, _, _ = select.select([proc.stdout], [], [], limit)
                if not ready:
                    proc.kill()
                    proc.wait()
                    if pending[0] not in retried:  # once more in a fresh worker: a machine
                        retried.add(pending[0])   # that stalled is not a hang that repeats
                        break
                    name, i = pending.pop(0)
                    results.append({"outcome": "hang" if started else "startup_hang",
                                    "seed_model": name, "index": i,
                                    "message": f"no answer within {limit:.0f} s, twice"})
                    break
                line = proc.stdout.readline()
                if not line:  # the worker died: the mutant it started crashed it
                    code = proc.wait()
                    stderr.seek(0)
                    tail = stderr.read().decode(errors="replace")[-1500:]
                    name, i = pending.pop(0)
                    results.append({"outcome": "crash", "seed_model": name, "index": i,
                                    "message": f"worker exit status {code}", "stderr": tail})
                    break
                if line.startswith("start "):
                    started, limit = True, PER_MUTANT_S
                elif line.startswith("result "):
                    results.append(json.loads(line[len("result "):]))
                    pending.pop(0)
                    started, limit = False, PER_MUTANT_S
            else:
                proc.wait()
    return results


FAILURES = ("raw", "numbers", "mismatch", "crash", "hang", "startup_hang")


def test_fuzz_mutants(device, request):
    n = request.config.getoption("--fuzz-mutants") or DEFAULT_MUTANTS
    seed = request.config.getoption("--fuzz-seed")
    seeds = sorted(fuzz_mutations.seed_models())
    t0 = time.perf_counter()
    results = run_mutants(device.spec, fuzz_mutations.plan_of(n, seeds, seed), seed)
    counts = Counter(r["outcome"] for r in results)
    bad = [r for r in results if r["outcome"] in FAILURES]
    summary = (f"{device.spec}: {len(results)} mutants (seed {seed}) in "
               f"{time.perf_counter() - t0:.0f} s: {dict(counts)}")
    print(summary)
    assert len(results) == n, summary
    lines = [f"  {r['outcome']}: {r['seed_model']} #{r['index']} (repro: python "
             f"tests/fuzz_mutations.py --repro {r['seed_model']} {seed} {r['index']} "
             f"--device {device.spec}): {r.get('error', '')} {r.get('message', '')}"
             for r in bad[:20]]
    assert not bad, summary + "\n" + "\n".join(lines)
    # the mutants reach past the parser: some run and agree with onnxruntime
    assert counts["ok"] > 0, summary
