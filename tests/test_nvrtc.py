"""The CUDA driver's programs compile with NVRTC itself, the compiler CuPy's RawModule uses, from
the exact text and options the driver hands it, for every tensor storage. NVRTC compiles without
a GPU (the test extra brings it as NVIDIA's nvidia-cuda-nvrtc-cu12 wheel); skipped, with the
reason, where its library is absent."""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import pytest

from offload.drivers import cuda
from offload.drivers._kernels import GEMM_GPU, PROGRAMS

STORAGES = {"float32": {}, "float16": {"STORAGE_F16": 1}, "bfloat16": {"STORAGE_BF16": 1}}
ARCH = "-arch=compute_90"  # H100/H200; CuPy passes the device's own compute capability


def _find_nvrtc() -> str | None:
    for root in sys.path:
        found = sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib",
                                              "libnvrtc.so.*")))
        if found:
            return found[0]
    found = sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def nvrtc():
    path = _find_nvrtc()
    if path is None:
        pytest.skip("NVRTC library not found (pip install nvidia-cuda-nvrtc-cu12)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def compile_ptx(lib, source: str, name: str, options: tuple) -> str:
    """NVRTC's PTX for ``source``; AssertionError with NVRTC's log when it fails."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                None)
    assert rc == 0, lib.nvrtcGetErrorString(rc)
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"{name} {' '.join(options)}: " \
                        f"{lib.nvrtcGetErrorString(rc).decode()}\n{log.value.decode()}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("program", PROGRAMS)
def test_driver_programs_compile_with_nvrtc(nvrtc, program, storage):
    defines = dict(STORAGES[storage])
    if program == "gemm.cl":
        defines.update(GEMM_GPU)
    ptx = compile_ptx(nvrtc, cuda.program_source(program), program,
                      cuda.nvrtc_options(defines) + (ARCH,))
    entries = {line.split()[-1].rstrip("(") for line in ptx.splitlines() if ".entry" in line}
    assert entries, f"{program}: no kernel entry in the PTX"
    if storage == "float16":  # the half conversions are the hardware instructions
        assert "cvt.rn.f16.f32" in ptx or "cvt.f32.f16" in ptx
