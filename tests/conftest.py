"""The device matrix: every test that takes ``device`` runs on every known device.

A device that is not available here is reported as skipped with its reason, never as passed.
Narrow the run with ``--device=cpu,opencl:0`` or ``OFFLOAD_TEST_DEVICES=cpu``.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

import offload

# (rtol, atol) per precision when a device is compared with the CPU device or onnxruntime.
TOLERANCE = {"float32": (1e-4, 1e-4), "tf32": (1e-2, 1e-2), "float16": (1e-2, 1e-2),
             "bfloat16": (5e-2, 5e-2)}


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("OFFLOAD_TEST_DEVICES", ""),
                     help="comma-separated device specs to test (default: every known device)")
    parser.addoption("--require-device", default=os.environ.get("OFFLOAD_TEST_REQUIRE", ""),
                     help="comma-separated device specs that must be available: the run stops "
                          "with their reasons instead of skipping their tests (e.g. cuda:0 on a "
                          "GPU machine)")
    parser.addoption("--emulation-full", action="store_true",
                     default=os.environ.get("OFFLOAD_TEST_EMULATION_FULL", "") == "1",
                     help="run the slow model cases on cuda-emu:0 in full (by default ResNet-50 "
                          "runs there at batch 1 only)")
    parser.addoption("--fuzz-mutants", type=int,
                     default=int(os.environ.get("OFFLOAD_FUZZ_MUTANTS", "0") or 0),
                     help="mutants per device for tests/test_fuzz.py (default: its short run)")
    parser.addoption("--fuzz-seed", type=int,
                     default=int(os.environ.get("OFFLOAD_FUZZ_SEED", "0") or 0),
                     help="seed of tests/test_fuzz.py's mutants")


SLOW_ON_EMULATION = {"cuda-emu:0"}


def full_on(config, device) -> bool:
    """Whether slow model cases run in full on ``device`` (always, except on the emulations
    listed in SLOW_ON_EMULATION without --emulation-full)."""
    return device.spec not in SLOW_ON_EMULATION or config.getoption("--emulation-full")


def _selected(config):
    wanted = [s for s in config.getoption("--device").split(",") if s.strip()]
    infos = offload.devices()
    if not wanted:
        return infos
    from offload.device import resolve_spec
    try:
        specs = {resolve_spec(s) for s in wanted}  # 'opencl:pocl' is the device it names
    except offload.DeviceUnavailableError as e:
        raise pytest.UsageError(f"--device: {e}") from None
    return [i for i in infos if i.spec in specs]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One short summary of the skips, grouped by reason (most frequent first), instead of one
    line per skipped test; `-rs` (or `-ra`) gives the full per-test list instead."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped or "s" in getattr(terminalreporter, "reportchars", ""):
        return
    counts: dict[str, int] = {}
    for report in skipped:
        reason = " ".join(_skip_reason(report).split())
        counts[reason] = counts.get(reason, 0) + 1
    width = max(40, terminalreporter._tw.fullwidth - 9)
    terminalreporter.section(f"{len(skipped)} skipped, by reason (per test: -rs)", sep="-")
    for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        line = reason if len(reason) <= width else reason[:width - 3] + "..."
        terminalreporter.write_line(f"{count:6d}  {line}")


def pytest_configure(config):
    required = [s for s in config.getoption("--require-device").split(",") if s.strip()]
    if required:
        from offload.device import unavailable
        missing = unavailable(required)
        if missing:
            raise pytest.UsageError("--require-device: not available: " + "; ".join(missing))
    config.addinivalue_line("markers", "fixed_point: a device-matrix test that also runs on "
                            "devices without float32 (the FPGA's ap_fixed-only devices)")


def _float32_skip(info, metafunc):
    """A skip mark for a float32 test on a device that runs fixed point only (xrt, xrt-emu)."""
    if not info.available or metafunc.definition.get_closest_marker("fixed_point"):
        return []
    precisions = offload.device(info.spec).capabilities.precisions
    if "float32" in precisions:
        return []
    return [pytest.mark.skip(reason=f"{info.spec} runs {'/'.join(sorted(precisions))} only; "
                             "float32 test does not apply")]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        params = []
        for info in _selected(metafunc.config):
            marks = _float32_skip(info, metafunc) if info.available else [pytest.mark.skip(
                reason=f"{info.spec} unavailable: {info.reason}")]
            params.append(pytest.param(info.spec, id=info.spec, marks=marks))
        metafunc.parametrize("device", params, indirect=True)


@pytest.fixture
def device(request):
    return offload.device(request.param)


@pytest.fixture(scope="session")
def cpu():
    return offload.device("cpu")


def assert_close(got, want, precision="float32", what=""):
    rtol, atol = TOLERANCE[precision]
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        err = np.abs(got.astype(np.float64) - want)
        raise AssertionError(f"{what}: max abs error {np.nanmax(err):.3g} at "
                             f"{np.unravel_index(np.nanargmax(err), err.shape)} "
                             f"(rtol={rtol}, atol={atol})")


def as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.fixture(scope="session")
def assert_matches_cpu():
    """Run ``source`` on ``device`` and on the CPU device with the same inputs and compare."""
    def check(source, device, inputs, precision="float32"):
        got = as_tuple(offload.load(source, device=device)(inputs))
        want = as_tuple(offload.load(source, device="cpu")(inputs))
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, precision, f"output {k} on {device.spec} vs cpu")
        return got
    return check


def find_nvcc() -> str | None:
    """nvcc on PATH or in /usr/local/cuda*/bin (the CUDA compile checks need no GPU)."""
    found = shutil.which("nvcc")
    if found:
        return found
    for path in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
        if os.access(path, os.X_OK):
            return path
    return None
