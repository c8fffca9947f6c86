"""The CuPy emulation behind cuda-emu:0 enforces what it says it enforces (its docstring): each
rule here is broken once and must be caught, so that the driver passing on cuda-emu:0 means
something. Skipped, with the reason, where NVRTC or g++ is missing."""

import ctypes

import numpy as np
import pytest

from offload.drivers import _kernels as K
from offload.drivers import cuda_emu


@pytest.fixture(scope="module")
def cp():
    info = cuda_emu.discover()[0]
    if not info.available:
        pytest.skip(info.reason)
    from offload.drivers import _cupy_emu
    yield _cupy_emu
    _cupy_emu.reset()


@pytest.fixture(scope="module")
def gemm_module(cp):
    options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in sorted(K.GEMM_GPU.items()))
    return cp.RawModule(code=K.kernel_source("gemm.cl"), options=options)


@pytest.fixture(scope="module")
def elementwise(cp):
    return cp.RawModule(code=K.kernel_source("elementwise.cl"), options=("-std=c++17",))


def _gemm_args(a, b, c, m, n, k):
    i32 = np.int32
    return (a, b, c, None, None, i32(m), i32(n), i32(k), i32(k), i32(n), i32(n), i32(1),
            *[i32(0)] * 9, np.float32(0), np.float32(-np.inf), np.float32(np.inf))


def test_barrier_kernel_runs_in_phases(cp, gemm_module):
    """gemm_tiled stages tiles in __shared__ memory between two __syncthreads(): run as fibers
    it gives the product; sizes that are not tile multiples check the edges."""
    rng = np.random.default_rng(1)
    m, n, k = 70, 90, 33
    A, B = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        a, b, c = cp.asarray(A), cp.asarray(B), cp.zeros((m, n), np.float32)
    fn = gemm_module.get_function("gemm_tiled")
    lx, ly = 64 // 4, 64 // 4
    fn((2, 2, 1), (lx, ly, 1), _gemm_args(a, b, c, m, n, k), stream=s)
    np.testing.assert_allclose(c.get(stream=s), A @ B, rtol=1e-5, atol=1e-5)


def test_kernel_arguments_are_checked_as_cupy_passes_them(cp, elementwise):
    fn = elementwise.get_function("activation")
    x = cp.zeros((8,), np.float32)
    f32, i32 = np.float32, np.int32
    good = (x, x, i32(8), i32(1), f32(0), f32(0), f32(1))
    fn((1,), (8,), good)
    with pytest.raises(cp.EmulationError, match="int of 4 bytes, got int of 8"):
        fn((1,), (8,), (x, x, 8, i32(1), f32(0), f32(0), f32(1)))  # a Python int: 8 bytes
    with pytest.raises(cp.EmulationError, match="float of 4 bytes, got float of 8"):
        fn((1,), (8,), (x, x, i32(8), i32(1), 0.5, f32(0), f32(1)))
    with pytest.raises(cp.EmulationError, match="takes 7 arguments"):
        fn((1,), (8,), good[:-1])
    host = np.zeros(8, np.float32)
    with pytest.raises(cp.EmulationError, match="not in device memory"):
        fn((1,), (8,), (np.uint64(host.ctypes.data),) + good[1:])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fn((1,), (8,), (host,) + good[1:])
    with pytest.raises(cp.CUDADriverError, match="INVALID_VALUE"):
        fn((1,), (2048,), good)


def test_device_memory_is_not_host_memory(cp):
    x = cp.empty((4,), np.float32)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    assert x.get().view(np.uint32).tolist() == [0xCDCDCDCD] * 4  # fresh memory is not zero


def test_streams_run_lazily_so_missing_waits_show(cp):
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    host = np.arange(4, dtype=np.float32)
    x = cp.empty((4,), np.float32)
    x.data.copy_from_host_async(host.ctypes.data, 16, s1)   # pageable: consumed now, runs later
    y = cp.empty((4,), np.float32)
    with s2:
        cp.copyto(y, x)                                       # no wait on s1
    assert y.get(stream=s2).view(np.uint32).tolist() == [0xCDCDCDCD] * 4
    with s2:
        s2.wait_event(s1.record())
        cp.copyto(y, x)
    np.testing.assert_array_equal(y.get(stream=s2), host)


def test_capture_rules(cp):
    s = cp.cuda.Stream(non_blocking=True)
    with pytest.raises(RuntimeError, match="legacy"):
        cp.cuda.Stream.null.begin_capture()
    s.begin_capture()
    with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureUnsupported"):
        s.synchronize()
    with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureInvalidated"):
        s.end_capture()
    x = cp.empty((4,), np.float32)
    s.begin_capture()
    with pytest.raises(cp.CUDARuntimeError, match="StreamCaptureUnsupported"):
        x.data.copy_from_host_async(np.zeros(4, np.float32).ctypes.data, 16, s)
    with pytest.raises(cp.CUDARuntimeError):
        s.end_capture()
    handle = cp.cublas.create()
    s.begin_capture()
    with s, pytest.raises(NotImplementedError, match="during stream capture"):
        cp.cublas.sgemmStridedBatched(handle, 0, 0, 1, 1, 1, 0, x.data.ptr, 1, 0, x.data.ptr,
                                      1, 0, 0, x.data.ptr, 1, 0, 1)
    s.end_capture()


def test_cublas_checks_sizes_and_bounds(cp):
    lib = cp.libcublas()
    from offload.drivers.cuda import declare_cublas
    undeclared = cp._blas._CFunction("cublasSetStream_v2", lambda h, s: 0)
    with pytest.raises(cp.EmulationError, match="declare argtypes"):
        undeclared(None, None)
    declare_cublas(lib)
    h = ctypes.c_void_p()
    assert lib.cublasCreate_v2(ctypes.byref(h)) == 0
    stream = cp.cuda.Stream(non_blocking=True)
    assert lib.cublasSetStream_v2(h, stream.ptr) == 0
    a = cp.zeros((4, 4), np.float32)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    p = a.data.ptr

    def sgemm(m, n, k, lda, ldb, ldc, count=1, stride=0):
        return lib.cublasSgemmStridedBatched(h, 0, 0, m, n, k, one.ctypes.data, p, lda, stride,
                                             p, ldb, stride, zero.ctypes.data, p, ldc, stride,
                                             count)
    assert sgemm(4, 4, 4, 4, 4, 4) == 0
    assert sgemm(4, 4, 4, 3, 4, 4) == 7           # lda < m: CUBLAS_STATUS_INVALID_VALUE
    assert sgemm(4, 4, 4, 4, 4, 4, -1) == 7
    assert sgemm(4, 4, 4, 4, 4, 4, count=2, stride=16) == 0  # batch 1 is past the block
    try:  # the call returned success; the fault shows when the stream runs, and sticks
        with pytest.raises(cp.CUDARuntimeError, match="IllegalAddress"):
            stream.synchronize()
        with pytest.raises(cp.CUDARuntimeError, match="IllegalAddress"):
            a.get()
    finally:
        cp.reset()
    lib.cublasDestroy_v2(h)


def test_cublas_numerics_in_reduced_precisions(cp):
    """tf32 rounds the inputs to 10 mantissa bits; bfloat16 results round to nearest even."""
    lib = cp.libcublas()
    from offload.drivers.cuda import declare_cublas
    declare_cublas(lib)
    h = ctypes.c_void_p()
    lib.cublasCreate_v2(ctypes.byref(h))
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    x = np.float32(1 + 2 ** -12)  # not a tf32 value: rounds to 1
    a = cp.asarray(np.full((1, 1), x, np.float32))
    c = cp.zeros((1, 1), np.float32)
    status = lib.cublasGemmStridedBatchedEx(h, 0, 0, 1, 1, 1, one.ctypes.data, a.data.ptr, 0,
                                            1, 0, a.data.ptr, 0, 1, 0, zero.ctypes.data,
                                            c.data.ptr, 0, 1, 0, 1, 77, -1)
    assert status == 0
    assert c.get()[0, 0] == 1.0
    status = lib.cublasGemmStridedBatchedEx(h, 0, 0, 1, 1, 1, one.ctypes.data, a.data.ptr, 0,
                                            1, 0, a.data.ptr, 0, 1, 0, zero.ctypes.data,
                                            c.data.ptr, 0, 1, 0, 1, 68, -1)
    assert status == 0 and c.get()[0, 0] == np.float32(x) * np.float32(x)
    lib.cublasDestroy_v2(h)
