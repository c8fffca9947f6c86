"""cuda-emu:0's cuBLAS: strided-batched GEMMs computed in NumPy on the emulated device memory,
reached two ways, as on a GPU: CuPy 14.2's Cython wrappers (``cupy_backends.cuda.libs.cublas``:
each call first sets the handle's stream to the current one and refuses stream capture) and the
C functions of libcublas through ctypes (``libcublas()``: the driver's declared ``argtypes`` are
checked against the prototypes of CUDA 13's ``cublas_api.h`` below)."""

from __future__ import annotations

import ctypes
import itertools
import threading
import types

import numpy as np

from . import CUBLASError, EmulationError, _gpu, _stream_of, get_current_stream

OK, NOT_INITIALIZED, INVALID_VALUE, NOT_SUPPORTED = 0, 1, 7, 15
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
COMPUTE_32F, COMPUTE_32F_FAST_TF32, COMPUTE_32F_FAST_16F, COMPUTE_32F_FAST_16BF = 68, 77, 74, 75
_ITEM = {CUDA_R_32F: 4, CUDA_R_16F: 2, CUDA_R_16BF: 2}

_handles: dict[int, dict] = {}
_ids = itertools.count(0x7C00_0000, 0x40)
_lock = threading.Lock()


def _create() -> int:
    with _lock:
        h = next(_ids)
        _handles[h] = {"stream": 0, "workspace": None, "math": 0}
    return h


# --------------------------------------------------------------------------------- numerics

def _to_float(raw: np.ndarray, dtype) -> np.ndarray:
    if dtype == CUDA_R_32F:
        return raw.view(np.float32)
    if dtype == CUDA_R_16F:
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _from_float(v: np.ndarray, dtype) -> np.ndarray:
    v = np.ascontiguousarray(v, np.float32)
    if dtype == CUDA_R_32F:
        return v.view(np.uint8)
    if dtype == CUDA_R_16F:
        return v.astype(np.float16).view(np.uint8)
    u = v.view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    bits = np.where((u & 0x7FFFFFFF) > 0x7F800000, ((u >> 16) | 0x40).astype(np.uint16), bits)
    return bits.view(np.uint8)


def _tf32(v: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32 (10 mantissa bits, nearest even), as the tensor cores read it."""
    u = np.ascontiguousarray(v, np.float32).view(np.uint32)
    r = (u + np.uint32(0xFFF) + ((u >> 13) & 1)) & np.uint32(0xFFFFE000)
    return np.where((u & 0x7FFFFFFF) >= 0x7F800000, u, r).view(np.float32)


def _matrix(ptr, rows, cols, ld, dtype, what):
    """The column-major rows x cols matrix at ``ptr`` (leading dimension ``ld``), bounds-checked
    against the device allocation it must lie in, as a float32 rows x cols array."""
    item = _ITEM[dtype]
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), np.float32)
    extent = ((cols - 1) * ld + rows) * item
    raw = _gpu.device_bytes(ptr, extent, what)
    if ld == rows:
        return _to_float(raw, dtype).reshape(cols, rows).T
    full = np.empty(cols * ld * item, np.uint8)
    full[:extent] = raw
    return _to_float(full, dtype).reshape(cols, ld)[:, :rows].T


def _store(ptr, value, ld, dtype, what):
    rows, cols = value.shape
    if rows == 0 or cols == 0:
        return
    item = _ITEM[dtype]
    extent = ((cols - 1) * ld + rows) * item
    raw = _gpu.device_bytes(ptr, extent, what)
    data = _from_float(value.T, dtype).reshape(cols, rows * item)
    if ld == rows:
        raw[:] = data.reshape(-1)
        return
    for j in range(cols):  # column by column: the bytes between columns are not touched
        raw[j * ld * item:j * ld * item + rows * item] = data[j]


def _gemm(handle, transa, transb, m, n, k, alpha, a, atype, lda, sa, b, btype, ldb, sb,
          beta, c, ctype, ldc, sc, count, compute, name):
    """Validate as cuBLAS does, then queue the product on the handle's stream; the status."""
    state = _handles.get(handle)
    if state is None:
        return NOT_INITIALIZED
    if transa not in (0, 1) or transb not in (0, 1):
        return INVALID_VALUE  # conjugate transposes are not emulated
    if min(m, n, k, count) < 0:
        return INVALID_VALUE
    ar, ac = (m, k) if transa == 0 else (k, m)
    br, bc = (k, n) if transb == 0 else (n, k)
    if lda < max(1, ar) or ldb < max(1, br) or ldc < max(1, m):
        return INVALID_VALUE
    if not (atype == btype == ctype) or atype not in _ITEM:
        return NOT_SUPPORTED
    if compute not in (COMPUTE_32F, COMPUTE_32F_FAST_TF32):
        return NOT_SUPPORTED
    if compute == COMPUTE_32F_FAST_TF32 and atype != CUDA_R_32F:
        return NOT_SUPPORTED
    if m == 0 or n == 0 or count == 0:
        return OK
    alpha_v = ctypes.c_float.from_address(alpha).value  # host pointer mode: read now
    beta_v = ctypes.c_float.from_address(beta).value
    item = _ITEM[atype]
    tf32 = compute == COMPUTE_32F_FAST_TF32

    def run():
        for z in range(count):
            what = f"{name} batch {z}"
            A = _matrix(a + z * sa * item, ar, ac, lda, atype, what + " A")
            B = _matrix(b + z * sb * item, br, bc, ldb, btype, what + " B")
            A = A if transa == 0 else A.T
            B = B if transb == 0 else B.T
            if tf32:
                A, B = _tf32(A), _tf32(B)
            prod = np.matmul(A, B, dtype=np.float32) * np.float32(alpha_v) \
                if k else np.zeros((m, n), np.float32)
            if beta_v != 0.0:  # beta == 0: C is not read (it may hold NaN)
                prod = prod + np.float32(beta_v) * _matrix(c + z * sc * item, m, n, ldc, ctype,
                                                           what + " C")
            _store(c + z * sc * item, prod.astype(np.float32), ldc, ctype, what + " C")
    _gpu.counters["gemms"] += 1
    _stream_of(state["stream"])._enqueue(run, name)
    return OK


# ------------------------------------------------------------------ CuPy's Cython wrappers

def cupy_cublas():
    """``cupy_backends.cuda.libs.cublas`` as CuPy 14.2 has it (the functions used)."""

    def check(status):
        if status != OK:
            raise CUBLASError(status)

    def size_t(x, name):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"'{type(x).__name__}' object cannot be interpreted as an integer "
                            f"({name})")
        return int(x)

    def set_stream(handle, stream):
        if _stream_of(stream).is_capturing():
            raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                      "unsupported")
        if handle not in _handles:
            raise CUBLASError(NOT_INITIALIZED)
        _handles[handle]["stream"] = int(stream)

    def _set_current(handle):
        set_stream(handle, get_current_stream().ptr)

    def destroy(handle):
        if _handles.pop(handle, None) is None:
            raise CUBLASError(NOT_INITIALIZED)

    def sgemm_strided_batched(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb,
                              strideB, beta, C, ldc, strideC, batchCount):
        alpha, beta = size_t(alpha, "alpha"), size_t(beta, "beta")
        _set_current(handle)
        check(_gemm(handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, strideA, B,
                    CUDA_R_32F, ldb, strideB, beta, C, CUDA_R_32F, ldc, strideC, batchCount,
                    COMPUTE_32F, "sgemmStridedBatched"))

    def gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA,
                                B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC,
                                batchCount, computeType, algo):
        alpha, beta = size_t(alpha, "alpha"), size_t(beta, "beta")
        _set_current(handle)
        check(_gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype,
                    ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType,
                    "gemmStridedBatchedEx"))

    return types.SimpleNamespace(
        CUBLASError=CUBLASError, create=_create, destroy=destroy, setStream=set_stream,
        getStream=lambda h: _handles[h]["stream"],
        setMathMode=lambda h, mode: _handles[h].__setitem__("math", mode),
        getVersion=lambda h: 130000,
        sgemmStridedBatched=sgemm_strided_batched,
        gemmStridedBatchedEx=gemm_strided_batched_ex)


# ------------------------------------------------------------------------ libcublas (ctypes)

_h, _i, _ll, _p, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, \
    ctypes.c_size_t
# cublas_api.h (CUDA 13): the C prototypes (return type cublasStatus_t, an int)
PROTOTYPES = {
    "cublasCreate_v2": [ctypes.POINTER(ctypes.c_void_p)],
    "cublasDestroy_v2": [_h],
    "cublasSetStream_v2": [_h, _p],
    "cublasSetWorkspace_v2": [_h, _p, _sz],
    "cublasSetMathMode": [_h, _i],
    "cublasGetVersion_v2": [_h, ctypes.POINTER(ctypes.c_int)],
    "cublasSgemmStridedBatched": [_h, _i, _i, _i, _i, _i, _p, _p, _i, _ll, _p, _i, _ll, _p, _p,
                                  _i, _ll, _i],
    "cublasGemmStridedBatchedEx": [_h, _i, _i, _i, _i, _i, _p, _p, _i, _i, _ll, _p, _i, _i,
                                   _ll, _p, _p, _i, _i, _ll, _i, _i, _i],
}


def _c_impls():
    def create(out):
        out[0] = _create()
        return OK

    def destroy(h):
        return OK if _handles.pop(h, None) is not None else NOT_INITIALIZED

    def set_stream(h, stream):
        if h not in _handles:
            return NOT_INITIALIZED
        try:
            _stream_of(stream or 0)
        except Exception:  # noqa: BLE001 - an unknown stream handle
            return INVALID_VALUE
        _handles[h]["stream"] = stream or 0
        return OK

    def set_workspace(h, ptr, size):
        if h not in _handles:
            return NOT_INITIALIZED
        if size and _gpu.find(ptr or 0, size) is None:
            return INVALID_VALUE  # cuBLAS would fault later; the emulation says it now
        if size and (ptr or 0) % 256:
            return INVALID_VALUE  # cuBLAS requires 256-byte alignment
        _handles[h]["workspace"] = (ptr or 0, size)
        return OK

    def set_math(h, mode):
        if h not in _handles:
            return NOT_INITIALIZED
        _handles[h]["math"] = mode
        return OK

    def version(h, out):
        out[0] = 130000
        return OK

    def sgemm(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, count):
        return _gemm(h, ta, tb, m, n, k, alpha or 0, A or 0, CUDA_R_32F, lda, sa, B or 0,
                     CUDA_R_32F, ldb, sb, beta or 0, C or 0, CUDA_R_32F, ldc, sc, count,
                     COMPUTE_32F, "cublasSgemmStridedBatched")

    def gemm_ex(h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc,
                count, compute, algo):
        return _gemm(h, ta, tb, m, n, k, alpha or 0, A or 0, at, lda, sa, B or 0, bt, ldb, sb,
                     beta or 0, C or 0, ct, ldc, sc, count, compute,
                     "cublasGemmStridedBatchedEx")

    return {"cublasCreate_v2": create, "cublasDestroy_v2": destroy,
            "cublasSetStream_v2": set_stream, "cublasSetWorkspace_v2": set_workspace,
            "cublasSetMathMode": set_math, "cublasGetVersion_v2": version,
            "cublasSgemmStridedBatched": sgemm, "cublasGemmStridedBatchedEx": gemm_ex}


class _CFunction:
    """One libcublas function: called through a real ctypes prototype (so the arguments are
    converted as for the shared library), after checking the caller declared the prototype
    (``argtypes``/``restype``) that cublas_api.h gives."""

    def __init__(self, name, impl):
        self.__name__ = name
        self.argtypes, self.restype = None, ctypes.c_int
        self._errors: list = []

        def guarded(*args):
            try:
                return impl(*args)
            except Exception as e:  # noqa: BLE001 - a fault inside a callback
                self._errors.append(e)
                return 14  # CUBLAS_STATUS_INTERNAL_ERROR
        self._c = ctypes.CFUNCTYPE(ctypes.c_int, *PROTOTYPES[name])(guarded)

    def __call__(self, *args):
        want = PROTOTYPES[self.__name__]
        if self.argtypes is None or [t for t in self.argtypes] != want:
            raise EmulationError(f"{self.__name__}: declare argtypes as cublas_api.h has them "
                                 f"({[t.__name__ for t in want]}); got "
                                 f"{self.argtypes and [t.__name__ for t in self.argtypes]}")
        if self.restype is not ctypes.c_int:
            raise EmulationError(f"{self.__name__}: restype must be c_int (cublasStatus_t)")
        status = self._c(*args)
        if self._errors:
            raise self._errors.pop()
        return status


class _LibCublas:
    def __init__(self):
        for name, impl in _c_impls().items():
            setattr(self, name, _CFunction(name, impl))
        self.path = "libcublas.so.13 (offload emulation)"


_lib = None


def libcublas():
    """The emulated libcublas (one per process, like the real shared library)."""
    global _lib
    if _lib is None:
        _lib = _LibCublas()
    return _lib
