#!/usr/bin/env python
"""gpu_check.sh's preflight (about 20 s), before offload is even built: versions (CuPy, CUDA
runtime and driver, cuBLAS, NVRTC), cuda:0 opened, one small GEMM through CuPy's cuBLAS wrapper
and one through libcublas's C function (the driver's direct path), and three stream captures:
a kernel alone, a kernel + CuPy-wrapped GEMM (CuPy 14.2 refuses: NotImplementedError, recorded)
and a kernel + direct GEMM (what offload's graphs need). Exit 1 with the reason when the GPU
cannot be used at all (no CuPy, no device, a wrong product); a failed capture is reported, not
fatal (the tests then show what it costs).

    python benchmarks/gpu_preflight.py            # the real CuPy on cuda:0
    python benchmarks/gpu_preflight.py --emulate  # offload's CuPy emulation (a dry run)

Self-contained on purpose (offload is not installed yet when it runs); the ctypes prototypes
repeat those of offload.drivers.cuda.declare_cublas.
"""

from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

KERNEL = r'''extern "C" __global__ void twice(float* x, int n)
{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = 2.0f * x[i]; }'''


def say(msg):
    print(f"preflight: {msg}", flush=True)


def libcublas_of(cp, emulate):
    if emulate:
        lib = cp.libcublas()
    else:
        paths = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if "/" in line else ""
                if "libcublas.so" in path and "Lt" not in path and path not in paths:
                    paths.append(path)
        lib = ctypes.CDLL(paths[0] if paths else "libcublas.so.13")
        say(f"libcublas: {paths[0] if paths else 'libcublas.so.13 (by soname)'}")
    h, i, ll, p, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, \
        ctypes.c_size_t
    for name, args in {
            "cublasCreate_v2": [ctypes.POINTER(ctypes.c_void_p)],
            "cublasSetStream_v2": [h, p], "cublasSetWorkspace_v2": [h, p, sz],
            "cublasSgemmStridedBatched": [h, i, i, i, i, i, p, p, i, ll, p, i, ll, p, p, i, ll,
                                          i]}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def main(argv=None) -> int:
    emulate = "--emulate" in (argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    try:
        if emulate:
            from offload.drivers import _cupy_emu as cp
            from offload.drivers._cupy_emu import cublas, nvrtc, runtime
        else:
            import cupy as cp
            from cupy_backends.cuda.api import runtime
            from cupy_backends.cuda.libs import cublas, nvrtc
    except Exception as e:  # noqa: BLE001
        say(f"FATAL: CuPy not importable: {type(e).__name__}: {e}")
        return 1
    try:
        say(f"CuPy {cp.__version__}; CUDA runtime {runtime.runtimeGetVersion()}, driver "
            f"{runtime.driverGetVersion()}; NVRTC {nvrtc.getVersion()}")
        props = runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        say(f"cuda:0 = {name}, sm_{props['major']}{props['minor']}, "
            f"{props['totalGlobalMem'] / 2**30:.0f} GiB")
        dev = cp.cuda.Device(0)
        dev.use()
        stream = cp.cuda.Stream(non_blocking=True)
        handle = cublas.create()
        say(f"cuBLAS {cublas.getVersion(handle)}")
    except Exception as e:  # noqa: BLE001
        say(f"FATAL: cannot open cuda:0: {type(e).__name__}: {e}")
        return 1

    m = n = k = 64
    rng = np.random.default_rng(0)
    a_h = rng.standard_normal((m, k)).astype(np.float32)
    b_h = rng.standard_normal((k, n)).astype(np.float32)
    want = a_h @ b_h
    alpha, beta = np.ones(1, np.float32), np.zeros(1, np.float32)
    with stream:
        a, b, c = cp.asarray(a_h), cp.asarray(b_h), cp.zeros((m, n), np.float32)
    stream.synchronize()

    def cupy_gemm():  # row-major C = A @ B as column-major C^T = B^T A^T
        with stream:
            cublas.sgemmStridedBatched(handle, 0, 0, n, m, k, alpha.ctypes.data, b.data.ptr, n,
                                       0, a.data.ptr, k, 0, beta.ctypes.data, c.data.ptr, n, 0,
                                       1)
    try:
        cupy_gemm()
        got = c.get(stream=stream)
        err = float(np.abs(got - want).max())
        say(f"GEMM through CuPy's wrapper: max |error| {err:.2e}")
        if not err < 1e-3:
            say("FATAL: the product is wrong")
            return 1
    except Exception as e:  # noqa: BLE001
        say(f"FATAL: GEMM through CuPy failed: {type(e).__name__}: {e}")
        return 1

    direct = None
    try:
        lib = libcublas_of(cp, emulate)
        dh = ctypes.c_void_p()
        assert lib.cublasCreate_v2(ctypes.byref(dh)) == 0
        assert lib.cublasSetStream_v2(dh, stream.ptr) == 0
        ws = cp.cuda.alloc(32 << 20)
        assert lib.cublasSetWorkspace_v2(dh, ws.ptr, 32 << 20) == 0

        def direct():
            status = lib.cublasSgemmStridedBatched(
                dh, 0, 0, n, m, k, alpha.ctypes.data, b.data.ptr, n, 0, a.data.ptr, k, 0,
                beta.ctypes.data, c.data.ptr, n, 0, 1)
            assert status == 0, f"status {status}"
        with stream:
            c.data.memset_async(0, c.nbytes, stream)
        direct()
        err = float(np.abs(c.get(stream=stream) - want).max())
        say(f"GEMM through libcublas (ctypes): max |error| {err:.2e}")
    except Exception as e:  # noqa: BLE001
        say(f"direct libcublas path FAILED: {type(e).__name__}: {e}")
        direct = None

    kernel = cp.RawModule(code=KERNEL, options=("-std=c++17",)).get_function("twice")
    x = cp.zeros((256,), np.float32)
    for label, extra in (("kernel alone", None), ("kernel + CuPy GEMM", cupy_gemm),
                         ("kernel + direct GEMM", direct)):
        if label.endswith("direct GEMM") and direct is None:
            say(f"capture {label}: skipped (no direct path)")
            continue
        try:
            with stream:
                stream.begin_capture()
                try:
                    kernel((1,), (256,), (x, np.int32(256)), stream=stream)
                    if extra is not None:
                        extra()
                finally:
                    graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            say(f"capture {label}: OK")
        except Exception as e:  # noqa: BLE001
            say(f"capture {label}: FAILED: {type(e).__name__}: {e}")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
