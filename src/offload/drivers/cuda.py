"""The CUDA device on CuPy: the shared kernel sources through NVRTC, cuBLAS for matrix products.

CuPy is imported lazily (inside functions): this module imports, and ``discover()`` answers,
without it. Discovery never raises: no CuPy, no driver, no GPU or no NVRTC/cuBLAS library each
list ``cuda:0`` as unavailable with the reason (the CUDA error name where there is one, e.g.
``cudaErrorInsufficientDriver``, ``cudaErrorNoDevice``). The driver reaches CuPy only through a
:class:`Backend` (the real CuPy, or the emulation behind ``cuda-emu:0``, see drivers/cuda_emu.py).

Layout and kernels. Activations are NCHW float32 CuPy arrays (views at offset 0 of raw blocks
from CuPy's memory pool). The kernels are those of ``offload/kernels`` (the OpenCL driver's
sources), expanded by ``kernel_source`` and compiled by ``cupy.RawModule`` (NVRTC) with the
CUDA side of ``dialect.h``; CuPy adds its own options (``-ftz=true`` among them: single-precision
denormals are flushed to zero in these kernels, not in cuBLAS's products and not on the cpu or
OpenCL devices; kept, as CuPy compiles everything so and denormal activations carry no
information). Any failure to build or load a module (NVRTC's compile log, another NVRTC error,
CuPy finding no CUDA headers, the driver refusing NVRTC's binary) is a ``KernelBuildError``.
Matrix products (dense, 1x1 convs, im2col convs) are cuBLAS strided-batched GEMMs in float32
(default math mode: no TF32), the weights broadcast over the batch with stride 0; the bias,
residual and activation are then applied in place by one epilogue kernel (``bias_act``).
Depthwise convs, im2col, pools, softmax, reductions, broadcast binary ops, pad/transpose
(gather6) and concat run the shared kernels with the OpenCL driver's argument conventions.

cuBLAS paths (``OFFLOAD_CUDA_BLAS``, read when a model opens its session). ``direct`` (default):
libcublas's C functions through ctypes on the library CuPy has loaded, on a handle whose stream
(``cublasSetStream_v2``) and 32 MiB workspace (``cublasSetWorkspace_v2``) are set once, then
only ``cublasSgemmStridedBatched``/``cublasGemmStridedBatchedEx`` calls: capturable in a CUDA
graph. ``cupy``: CuPy's wrappers, which set the stream before every call and raise
``NotImplementedError`` during stream capture (CuPy 14.2), so such plans run as plain launches
(kept to measure the difference: benchmarks/bench_gpu.py's ``blas:`` points).

Execution. One non-blocking stream and cuBLAS handle per model (``session``); every enqueue holds
the device's lock (so that a graph capture never records another thread's work). ``copy_in``/
``copy_out`` go through page-locked staging buffers (one per device buffer, allocated on first
use) with asynchronous copies on the stream; an input already page-locked (``offload.empty(...,
pinned=True)``, or memory CUDA reports as cudaMemoryTypeHost) is copied from directly, without
the staging copy; ``synchronize`` waits on an event recorded on the stream.

CUDA graphs. ``finalize(runs)`` runs a plan's steps once (outside capture: lazy module loads and
cuBLAS initialisation happen there), then captures them on the stream into one graph per plan,
i.e. per (model, input shapes): an inference is then one ``graph.launch``. If capture fails, the
plan falls back to plain launches of its steps; ``device.graphs`` counts captures and
``device.graph_fallbacks`` records why (both shared by the device and every model's session).
Set ``OFFLOAD_CUDA_GRAPHS=0`` to disable capture.

Device arrays. A CuPy array or PyTorch CUDA tensor on this GPU (DLPack device (2, index)) goes
in without a host round trip: one device-to-device copy into the plan's input on the model's
stream, after the model's stream waits on an event recorded on the caller's current CuPy stream
(where a CuPy producer queued the data) and with the model's stream handed to the DLPack
producer (PyTorch orders its own stream before it). ``model(x, out="device")`` returns float32
CuPy arrays in every precision (a 16-bit plan's outputs converted on the device), copies since
the plan's buffers are reused by the next call.

Precisions (``offload.load(..., precision=...)``, see offload.precision): float32 (sgemm,
no tensor-op rounding), tf32 (GemmStridedBatchedEx with CUBLAS_COMPUTE_32F_FAST_TF32),
float16 and bfloat16 (activations and weights stored in 16 bits, every kernel compiled with
STORAGE_F16/STORAGE_BF16 converting on load and store, products through GemmStridedBatchedEx
with float32 accumulation).

Not implemented: NHWC (every layout here is NCHW; NHWC was not measured), cuBLASLt epilogues
(the bias/activation epilogue is one extra kernel per product).
"""

from __future__ import annotations

import copy
import math
import os
import threading
import weakref

import numpy as np

from .. import graph as G
from ..device import ALL_DTYPES, Capabilities, Device, DeviceInfo
from ..hostmem import address
from ..errors import DeviceMemoryError, DeviceRuntimeError, KernelBuildError
from ._builders import SHARED, epilogue_args, launch
from ._kernels import (ACTIVATIONS, GEMM_GPU, PROGRAMS, _operand, _sequence, kernel_source,
                       matmul_plan)

BLOCK_1D = 256
NULL = np.uint64(0)  # a null pointer kernel argument (absent bias / residual)
i32, f32 = np.int32, np.float32
CUBLAS_OP_N = 0
# cublasGemmStridedBatchedEx per precision: (cudaDataType of A, B and C, cublasComputeType).
# Products accumulate in float32 in every precision; tf32 rounds the float32 inputs to TF32 on
# the tensor cores. float32 itself goes through sgemmStridedBatched (no tensor-op rounding).
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
GEMM_EX = {"tf32": (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
           "float16": (CUDA_R_16F, CUBLAS_COMPUTE_32F),
           "bfloat16": (CUDA_R_16BF, CUBLAS_COMPUTE_32F)}
NO_CUPY = "CuPy is not installed (pip install offload[cuda])"
# cuBLAS: "direct" calls libcublas's C functions through ctypes on a handle whose stream and
# workspace are set once (capturable in a CUDA graph); "cupy" calls CuPy's wrappers, which set
# the handle's stream before every call and raise NotImplementedError during stream capture
# (CuPy 14.2, cupy_backends/cuda/libs/cublas.pyx), so plans with products then run as plain
# launches. OFFLOAD_CUDA_BLAS picks one per model (read when the model opens its session).
BLAS_PATHS = ("direct", "cupy")
WORKSPACE_BYTES = 32 << 20  # cuBLAS's recommended user workspace on Hopper (cublasSetWorkspace)
_CUBLAS_STATUS = {1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED",
                  7: "CUBLAS_STATUS_INVALID_VALUE", 8: "CUBLAS_STATUS_ARCH_MISMATCH",
                  11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
                  14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED",
                  16: "CUBLAS_STATUS_LICENSE_ERROR"}


class Backend:
    """What the driver uses of CuPy, by name: the real CuPy (:func:`cupy_backend`) or the
    emulation of cuda-emu:0 (``offload.drivers.cuda_emu``). ``cp`` is the cupy module, then
    ``runtime``, ``driver``, ``cublas`` and ``nvrtc`` of ``cupy_backends``, CuPy's
    ``CompileException``, and ``libcublas()`` the ctypes library for the direct path."""

    def __init__(self, cp, runtime, driver, cublas, nvrtc, compile_exception, libcublas,
                 emulated=False):
        self.cp, self.runtime, self.driver, self.cublas, self.nvrtc = \
            cp, runtime, driver, cublas, nvrtc
        self.CompileException, self.libcublas, self.emulated = \
            compile_exception, libcublas, emulated
        cuda = [driver.CUDADriverError, runtime.CUDARuntimeError, cublas.CUBLASError,
                nvrtc.NVRTCError, CUBLASStatusError,
                NotImplementedError]  # CuPy's cuBLAS wrappers in a capture
        self.memory_errors = (cp.cuda.memory.OutOfMemoryError, MemoryError)
        self.cuda_errors = tuple(cuda)


def cupy_backend() -> Backend:
    """The installed CuPy (ImportError without it)."""
    import cupy
    from cupy.cuda.compiler import CompileException
    from cupy_backends.cuda.api import driver, runtime
    from cupy_backends.cuda.libs import cublas, nvrtc
    return Backend(cupy, runtime, driver, cublas, nvrtc, CompileException, load_libcublas)


class CUBLASStatusError(RuntimeError):
    """A libcublas C function returned a status other than CUBLAS_STATUS_SUCCESS."""

    def __init__(self, function, status):
        self.status = status
        super().__init__(f"{function} returned {_CUBLAS_STATUS.get(status, status)}")


_libcublas = None


def load_libcublas():
    """libcublas as a ctypes library (declare_cublas sets the prototypes): the copy CuPy has
    already loaded (found in /proc/self/maps), else by its soname."""
    global _libcublas
    if _libcublas is not None:
        return _libcublas
    import ctypes
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if "/" in line else ""
                if os.path.basename(path).startswith("libcublas.so") and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    errors = []
    for path in paths + ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]:
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise OSError(f"libcublas not loadable: {'; '.join(errors)}")
    lib.path = getattr(lib, "_name", "")
    _libcublas = lib
    return lib


def declare_cublas(lib) -> None:
    """Set argtypes/restype of the libcublas functions the driver calls (cublas_api.h)."""
    import ctypes
    h, i, ll, p, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, \
        ctypes.c_size_t
    protos = {
        "cublasCreate_v2": [ctypes.POINTER(ctypes.c_void_p)],
        "cublasDestroy_v2": [h],
        "cublasSetStream_v2": [h, p],
        "cublasSetWorkspace_v2": [h, p, sz],
        "cublasSgemmStridedBatched": [h, i, i, i, i, i, p, p, i, ll, p, i, ll, p, p, i, ll, i],
        "cublasGemmStridedBatchedEx": [h, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i,
                                       i, ll, i, i, i],
    }
    for name, args in protos.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


class _DirectBlas:
    """One cuBLAS handle used through libcublas's C functions: stream and workspace set once,
    then only GEMM calls (nothing a stream capture refuses)."""

    def __init__(self, device, stream):
        import ctypes
        self.lib = lib = device._backend.libcublas()
        declare_cublas(lib)
        self.handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(self.handle)))
        weakref.finalize(self, _destroy_direct, lib, self.handle)
        self._check("cublasSetStream_v2", lib.cublasSetStream_v2(self.handle, stream.ptr))
        self.workspace = device.alloc(WORKSPACE_BYTES)  # lives with the handle
        self._check("cublasSetWorkspace_v2", lib.cublasSetWorkspace_v2(
            self.handle, self.workspace.mem.ptr, WORKSPACE_BYTES))
        self._alpha = np.ones(1, np.float32)
        self._beta = np.zeros(1, np.float32)
        self.alpha, self.beta = self._alpha.ctypes.data, self._beta.ctypes.data

    @staticmethod
    def _check(function, status):
        if status:
            raise CUBLASStatusError(function, status)

    def gemm(self, precision, m, n, k, a_ptr, lda, sa, b_ptr, ldb, sb, c_ptr, ldc, sc, count):
        """Row-major C[z] = A[z] @ B[z] as the column-major C^T = B^T A^T."""
        if precision == "float32":
            self._check("cublasSgemmStridedBatched", self.lib.cublasSgemmStridedBatched(
                self.handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, self.alpha, b_ptr, ldb, sb,
                a_ptr, lda, sa, self.beta, c_ptr, ldc, sc, count))
            return
        dtype, compute = GEMM_EX[precision]
        self._check("cublasGemmStridedBatchedEx", self.lib.cublasGemmStridedBatchedEx(
            self.handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, self.alpha, b_ptr, dtype, ldb, sb,
            a_ptr, dtype, lda, sa, self.beta, c_ptr, dtype, ldc, sc, count, compute,
            CUBLAS_GEMM_DEFAULT))


def _destroy_direct(lib, handle):
    try:
        lib.cublasDestroy_v2(handle)
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass


def nvrtc_options(defines: dict | None = None) -> tuple:
    """The options the driver gives CuPy's RawModule for a program of kernels/ (C++17 plus the
    defines); CuPy adds its own (see cuda_emu.cupy_nvrtc_options, -ftz=true among them)."""
    return ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))


def program_source(name: str) -> str:
    """The CUDA source of a program: kernels/<name> with its includes expanded."""
    return kernel_source(name)


# ---------------------------------------------------------------------------------- errors

def map_error(device, e, what: str):
    """The typed offload error for a CuPy/CUDA error raised while doing ``what``."""
    text = str(e)
    if isinstance(e, device._backend.memory_errors) or "cudaErrorMemoryAllocation" in text \
            or "OUT_OF_MEMORY" in text or "ALLOC_FAILED" in text:
        return DeviceMemoryError(f"{device.spec}: out of device memory while {what} "
                                 f"({device.bytes_in_use} bytes in use): {text}")
    return DeviceRuntimeError(f"{device.spec}: {what} failed: {type(e).__name__}: {text}")


# ---------------------------------------------------------------------------------- memory

class Raw:
    """A device memory block (a CuPy MemoryPointer) and its size."""

    __slots__ = ("mem", "nbytes", "__weakref__")

    def __init__(self, mem, nbytes):
        self.mem, self.nbytes = mem, nbytes


class _Shared:
    """What a device and the per-model sessions made from it share: compiled modules, the
    enqueue lock, graph counters (a session is a shallow copy: its own attributes would not
    be seen by the device the caller holds)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.modules: dict[tuple, object] = {}
        self.graphs = 0
        self.graph_fallbacks: list[str] = []
        self.in_use = 0

    def release(self, nbytes):
        self.in_use -= nbytes


# ---------------------------------------------------------------------------------- device

class CUDADevice(Device):
    """One GPU: a non-blocking stream, a cuBLAS handle on it, the NVRTC-built modules."""

    kind = "cuda"

    def __init__(self, index: int, backend: Backend | None = None, kind: str = "cuda",
                 name: str | None = None):
        backend = backend or cupy_backend()
        cp, runtime = backend.cp, backend.runtime
        self.kind = kind
        self.index = index
        self._backend = backend
        self._errors = (backend.memory_errors, backend.cuda_errors)
        self._cp = cp
        self._cublas = backend.cublas
        self._runtime = runtime
        self._dev = cp.cuda.Device(index)
        self._shared = _Shared()
        self._lock = self._shared.lock
        self._tls = threading.local()
        self._staging: dict[int, object] = {}
        self.emulated = backend.emulated
        try:
            with self._dev:
                props = runtime.getDeviceProperties(index)
                gpu = props["name"]
                gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
                self.name = name or gpu
                self.compute_capability = f"{props['major']}{props['minor']}"
                self._alpha = np.ones(1, np.float32)   # host scalars for pointer-taking
                self._beta = np.zeros(1, np.float32)   # cuBLAS bindings (kept alive here)
                self._gemm_takes_pointers = None
                self._open_queue()
        except self._errors[1] as e:
            raise map_error(self, e, "opening the device") from None
        self.ops = OPS
        self.capabilities = Capabilities(frozenset(OPS), dtypes=ALL_DTYPES, precisions=frozenset(
            {"float32", *GEMM_EX}))
        self.dlpack_device = (2, index)  # kDLCUDA: CuPy arrays and CUDA tensors on this GPU
        self.build_stats = {"compiled": 0, "seconds": 0.0}

    def _open_queue(self):
        """This object's stream and cuBLAS handle (OFFLOAD_CUDA_BLAS: direct or cupy)."""
        cp = self._cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        blas = os.environ.get("OFFLOAD_CUDA_BLAS", "direct")
        if blas not in BLAS_PATHS:
            raise UnsupportedOpError(f"OFFLOAD_CUDA_BLAS={blas!r}: expected one of "
                                     f"{BLAS_PATHS}", [("gemm", "")])
        self.blas = blas
        self.handle = self._cublas.create()
        weakref.finalize(self, _destroy_handle, self._cublas, self.handle)
        self._cublas.setStream(self.handle, self.stream.ptr)
        self._direct = None
        if blas == "direct":
            try:
                self._direct = _DirectBlas(self, self.stream)
            except (OSError, AttributeError, CUBLASStatusError) as e:
                # no usable libcublas C API: CuPy's wrappers work, graphs without products only
                self.blas = "cupy"
                why = (f"direct cuBLAS path unavailable ({type(e).__name__}: {e}); using "
                       "CuPy's wrappers: plans with matrix products run without CUDA graphs")
                if why not in self._shared.graph_fallbacks:
                    self._shared.graph_fallbacks.append(why)
                    import warnings
                    warnings.warn(f"offload {self.spec}: {why}", RuntimeWarning, stacklevel=2)

    @property
    def graphs(self) -> int:
        """CUDA graphs captured for plans on this GPU (all sessions)."""
        return self._shared.graphs

    @property
    def graph_fallbacks(self) -> list:
        """Why plans on this GPU run as plain launches (one entry per plan that fell back)."""
        return self._shared.graph_fallbacks

    @property
    def _modules(self):
        return self._shared.modules

    def session(self) -> "CUDADevice":
        """This GPU with its own non-blocking stream and cuBLAS handle, for one model: its copies,
        kernels, products and graph launches go to that stream and overlap other models' work.
        Compiled modules, the enqueue lock and the graph counters are shared."""
        twin = copy.copy(self)
        try:
            with self._dev:
                twin._open_queue()
        except self._errors[1] as e:
            raise map_error(self, e, "creating a stream for a model") from None
        twin._tls = threading.local()
        twin._staging = {}
        return twin

    # -- memory ---------------------------------------------------------------------------
    @property
    def bytes_in_use(self) -> int:
        return self._shared.in_use

    def alloc(self, nbytes: int) -> Raw:
        cp = self._cp
        nbytes = max(int(nbytes), 4)
        try:
            with self._dev:
                mem = cp.cuda.alloc(nbytes)
        except self._errors[0] as e:
            raise DeviceMemoryError(f"{self.spec}: cannot allocate {nbytes} bytes "
                                    f"({self.bytes_in_use} bytes in use by offload): {e}") \
                from None
        except self._errors[1] as e:
            raise map_error(self, e, f"allocating {nbytes} bytes") from None
        raw = Raw(mem, nbytes)
        self._shared.in_use += nbytes
        # the finalizer must not hold this device: a session's cuBLAS workspace is one of its
        # blocks, and a callback holding the session would keep both alive for ever
        weakref.finalize(raw, self._shared.release, nbytes)
        return raw

    def view(self, raw: Raw, shape, dtype=np.float32):
        cp = self._cp
        shape = tuple(int(d) for d in shape)
        assert math.prod(shape) * np.dtype(dtype).itemsize <= raw.nbytes or math.prod(shape) == 0
        with self._dev:
            return cp.ndarray(shape, dtype, memptr=raw.mem)

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array, dtype=np.float32 if array.dtype == np.float64 else None)
        buf = self.view(self.alloc(array.nbytes), array.shape, array.dtype)
        if array.nbytes:
            try:
                with self._dev, self._lock:
                    buf.data.copy_from_host_async(array.ctypes.data, array.nbytes, self.stream)
                    self.stream.synchronize()  # ``array`` may be a temporary
            except self._errors[1] as e:
                raise map_error(self, e, "uploading a weight") from None
        return buf

    def _stage(self, buf) -> np.ndarray:
        """The page-locked host staging array of ``buf`` (same shape and dtype)."""
        key = buf.data.ptr
        stage = self._staging.get(key)
        if stage is None or stage.shape != buf.shape or stage.dtype != buf.dtype:
            cp = self._cp
            try:
                mem = cp.cuda.alloc_pinned_memory(max(buf.nbytes, 1))
            except Exception as e:  # noqa: BLE001 - CUDA error or host out of memory
                raise DeviceMemoryError(f"{self.spec}: cannot allocate {buf.nbytes} bytes of "
                                        f"page-locked host staging: {e}") from None
            stage = np.frombuffer(mem, buf.dtype, buf.size).reshape(buf.shape)
            self._staging[key] = stage
        return stage

    def _page_locked(self, src: np.ndarray) -> bool:
        """Whether ``src`` is page-locked host memory: an ``offload.empty(pinned=True)`` block,
        or memory the CUDA runtime reports as cudaMemoryTypeHost (cupyx.empty_pinned, torch's
        pin_memory(), cudaHostRegister)."""
        if _page_locked(src):
            return True
        try:
            attrs = self._runtime.pointerGetAttributes(address(src))
        except Exception:  # noqa: BLE001 - unregistered memory on old runtimes raises
            return False
        return getattr(attrs, "type", 0) == 1  # cudaMemoryTypeHost

    def copy_in(self, dst, src) -> int:
        if dst.nbytes == 0:
            return 0
        if not isinstance(src, np.ndarray):  # an array in this GPU's memory (DLPack)
            return self._copy_in_device_array(dst, src)
        if (src.dtype == dst.dtype and src.nbytes == dst.nbytes and src.flags.c_contiguous
                and self._page_locked(src)):
            try:  # straight from the caller's page-locked memory: no staging copy
                with self._dev, self._lock:
                    dst.data.copy_from_host_async(address(src), dst.nbytes, self.stream)
            except self._errors[1] as e:
                raise map_error(self, e, "copying in") from None
            return dst.nbytes
        stage = self._stage(dst)
        np.copyto(stage, np.reshape(src, dst.shape), casting="same_kind")
        try:
            with self._dev, self._lock:
                dst.data.copy_from_host_async(stage.ctypes.data, dst.nbytes, self.stream)
        except self._errors[1] as e:
            raise map_error(self, e, "copying in") from None
        return dst.nbytes

    def _copy_in_device_array(self, dst, src) -> int:
        """Copy a CuPy array / CUDA tensor on this GPU into ``dst`` on the model's stream, no
        host round trip, ordered after the producer's work: the model's stream first waits on
        an event recorded on the caller's current CuPy stream (where a CuPy producer queued
        it), then ``cupy.from_dlpack`` runs with the model's stream current, so a DLPack
        producer that tracks its own streams (PyTorch) is handed that stream and adds its wait."""
        cp = self._cp
        try:
            with self._dev, self._lock:
                caller = cp.cuda.get_current_stream()
                if caller.ptr != self.stream.ptr:
                    self.stream.wait_event(caller.record())
                with self.stream:
                    array = cp.from_dlpack(src)
                    cp.copyto(dst, array.reshape(dst.shape))
        except self._errors[1] as e:
            raise map_error(self, e, "copying in a device array") from None
        return dst.nbytes

    def device_array(self, src):
        """A new float32 CuPy array on this GPU holding a copy of ``src`` (a 16-bit plan's
        buffers are converted on the device, so device outputs are float32 as host outputs
        are), complete when returned (any stream may use it)."""
        cp = self._cp
        try:
            with self._dev, self._lock, self.stream:
                out = src.copy() if src.dtype == np.float32 else src.astype(np.float32)
                self.stream.synchronize()
        except self._errors[0] as e:
            raise DeviceMemoryError(f"{self.spec}: cannot allocate {src.nbytes} bytes for an "
                                    f"output ({self.bytes_in_use} bytes in use by offload): "
                                    f"{e}") from None
        except self._errors[1] as e:
            raise map_error(self, e, "copying an output on the device") from None
        assert isinstance(out, cp.ndarray)
        return out

    def copy_out(self, dst: np.ndarray, src) -> int:
        if dst.nbytes == 0:
            return 0
        stage = self._stage(src)
        try:
            with self._dev:
                with self._lock:
                    src.data.copy_to_host_async(stage.ctypes.data, src.nbytes, self.stream)
                    event = self._record()
                event.synchronize()
        except self._errors[1] as e:
            raise map_error(self, e, "copying out (or a kernel before it)") from None
        np.copyto(dst, stage.reshape(dst.shape))
        return dst.nbytes

    def _record(self):
        """An event recorded now on the stream (one per thread, reused); call with the lock."""
        event = getattr(self._tls, "event", None)
        if event is None:
            event = self._tls.event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record(self.stream)
        return event

    def synchronize(self) -> None:
        try:
            with self._dev:
                with self._lock:
                    event = self._record()
                event.synchronize()
        except self._errors[1] as e:
            raise map_error(self, e, "running the stream") from None

    # -- programs -------------------------------------------------------------------------
    def module(self, name: str, defines: dict | None = None, source: str | None = None):
        """The NVRTC-built module of kernels/<name> (or of a generated ``source``), built once
        per device."""
        import time
        cp = self._cp
        options = nvrtc_options(defines)
        key = (name, options, source)
        with self._lock:
            mod = self._modules.get(key)
            if mod is None:
                t0 = time.perf_counter()
                text = source if source is not None else program_source(name)
                with self._dev:
                    mod = cp.RawModule(code=text, options=options, backend="nvrtc")
                    self._force_build(mod, name, options, text)
                self.build_stats["compiled"] += 1
                self.build_stats["seconds"] += time.perf_counter() - t0
                self._modules[key] = mod
            return mod

    def _force_build(self, mod, name, options, text):
        """RawModule compiles lazily: compile now so that errors surface at build time. NVRTC's
        compile errors, its other errors (createProgram, invalid option), CuPy's RuntimeError
        when it finds no CUDA headers, and the driver refusing the binary at load (e.g.
        CUDA_ERROR_UNSUPPORTED_PTX_VERSION: NVRTC newer than the driver) are KernelBuildErrors."""
        backend = self._backend
        what = f"{self.spec}: building {name} with NVRTC failed (options {' '.join(options)!r})"
        try:
            mod.compile()
        except backend.CompileException as e:
            raise KernelBuildError(what, str(e), text) from None
        except backend.nvrtc.NVRTCError as e:
            raise KernelBuildError(what, f"NVRTCError: {e}", text) from None
        except backend.driver.CUDADriverError as e:
            raise KernelBuildError(f"{self.spec}: loading the NVRTC binary of {name} failed "
                                   f"(the driver may be older than NVRTC)", str(e), text) \
                from None
        except backend.runtime.CUDARuntimeError as e:
            raise map_error(self, e, f"loading {name}") from None
        except RuntimeError as e:  # CuPy: 'Failed to find CUDA headers ...'
            raise KernelBuildError(what, f"{type(e).__name__}: {e}", text) from None

    def launch_1d(self, program, name, n, args, what, defines=None, source=None):
        """The runtime of the shared builders (drivers/_builders.py): one 1-D launch on the
        stream; None arguments become null pointers."""
        args = tuple(NULL if a is None else a for a in args)
        return _launch(self, self.kernel(program, name, defines, source),
                       (-(-n // BLOCK_1D),), (BLOCK_1D,), args, what)

    def kernel(self, program: str, name: str, defines: dict | None = None, source=None):
        mod = self.module(program, defines, source)
        try:
            with self._dev:
                return mod.get_function(name)
        except self._errors[1] as e:
            raise map_error(self, e, f"getting kernel {name}") from None

    # -- cuBLAS ---------------------------------------------------------------------------
    def _gemm_call(self, precision):
        """The callable running one strided-batched product in ``precision`` on this object's
        handle: ``call(m, n, k, a_ptr, lda, sa, b_ptr, ldb, sb, c_ptr, ldc, sc, count)``."""
        if self._direct is not None:
            direct = self._direct

            def call(*args):
                direct.gemm(precision, *args)
            return call
        self._probe_gemm_binding()
        if precision == "float32":
            return self._sgemm_batched

        def call(*args):
            self._gemm_ex_batched(precision, *args)
        return call

    def _sgemm_batched(self, m, n, k, a_ptr, lda, sa, b_ptr, ldb, sb, c_ptr, ldc, sc, count):
        """Row-major C[z] = A[z] @ B[z] (A [m, k], B [k, n], C [m, n]) for z < count, as the
        column-major product C^T = B^T A^T, through CuPy's wrapper. Call with the lock held and
        the stream current."""
        cublas = self._cublas
        if self._gemm_takes_pointers:
            alpha, beta = self._alpha.ctypes.data, self._beta.ctypes.data
        else:
            alpha, beta = 1.0, 0.0
        cublas.sgemmStridedBatched(self.handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, alpha,
                                   b_ptr, ldb, sb, a_ptr, lda, sa, beta, c_ptr, ldc, sc, count)

    def _gemm_ex_batched(self, precision, m, n, k, a_ptr, lda, sa, b_ptr, ldb, sb, c_ptr, ldc,
                         sc, count):
        """As _sgemm_batched in a reduced precision (GEMM_EX): float32 alpha/beta by host
        pointer, float32 accumulation."""
        dtype, compute = GEMM_EX[precision]
        self._cublas.gemmStridedBatchedEx(
            self.handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, self._alpha.ctypes.data,
            b_ptr, dtype, ldb, sb, a_ptr, dtype, lda, sa, self._beta.ctypes.data,
            c_ptr, dtype, ldc, sc, count, compute, CUBLAS_GEMM_DEFAULT)

    def _probe_gemm_binding(self):
        """CuPy's sgemmStridedBatched takes alpha/beta as floats in some versions and as host
        pointers in others (14.2: pointers): try floats (a pointer-taking binding rejects a
        float with TypeError, never misreads it) on a 1x1x1 product, then pointers."""
        if self._gemm_takes_pointers is not None:
            return
        cp = self._cp
        with self._dev, self._lock, self.stream:
            a = cp.full((1,), 2.0, cp.float32)
            c = cp.zeros((1,), cp.float32)
            self.stream.synchronize()
            self._gemm_takes_pointers = False
            try:
                self._sgemm_batched(1, 1, 1, a.data.ptr, 1, 0, a.data.ptr, 1, 0, c.data.ptr, 1,
                                    0, 1)
            except TypeError:
                self._gemm_takes_pointers = True
                self._sgemm_batched(1, 1, 1, a.data.ptr, 1, 0, a.data.ptr, 1, 0, c.data.ptr, 1,
                                    0, 1)
            self.stream.synchronize()
            got = float(c.get(stream=self.stream)[0])
        if got != 4.0:
            raise DeviceRuntimeError(f"{self.spec}: cuBLAS self-check: 2 * 2 gave {got}")

    # -- graphs ---------------------------------------------------------------------------
    def finalize(self, runs: list) -> list:
        """The plan's steps as one CUDA graph launch (see the module docstring), else as they
        are."""
        runs = list(runs)
        if not runs:
            return runs
        if os.environ.get("OFFLOAD_CUDA_GRAPHS", "1") == "0":
            return runs
        runtime = self._runtime
        graph = None
        with self._dev, self._lock:
            for run in runs:  # warm-up outside capture: module loads, cuBLAS initialisation
                run()
            self.stream.synchronize()
            try:
                self.stream.begin_capture(mode=runtime.streamCaptureModeRelaxed)
                try:
                    for run in runs:
                        run()
                finally:
                    graph = self.stream.end_capture()
                graph.upload(self.stream)
                self.stream.synchronize()
            except Exception as e:  # noqa: BLE001 - any capture failure: plain launches
                graph = None
                cause = e.__cause__ or e.__context__ if isinstance(e, DeviceRuntimeError) else e
                self._shared.graph_fallbacks.append(
                    f"{type(e).__name__}: {e}" + (f" (from {type(cause).__name__})"
                                                  if cause is not None and cause is not e
                                                  else ""))
                try:
                    if self.stream.is_capturing():
                        self.stream.end_capture()
                except Exception:  # noqa: BLE001 - the capture was invalidated
                    pass
        if graph is None:
            return runs
        self._shared.graphs += 1
        stream, lock, dev, errors = self.stream, self._lock, self._dev, self._errors[1]
        keep = tuple(runs)  # the buffers and kernels the graph points at stay alive with it

        def launch():
            assert keep
            try:
                with dev, lock:
                    graph.launch(stream)
            except errors as e:
                raise map_error(self, e, "launching the plan's CUDA graph") from None
        launch.graph = graph
        return [launch]

    def __repr__(self) -> str:
        return f"<offload.Device {self.spec} {self.name!r}>"



def _page_locked(array: np.ndarray) -> bool:
    """Whether ``array`` views an ``offload.empty(..., pinned=True)`` block (its HostBuffer says
    so; views of views are followed a few levels)."""
    base = array
    for _ in range(4):
        base = getattr(base, "base", None)
        if base is None:
            return False
        owner = getattr(base, "obj", None)  # a memoryview of the HostBuffer
        if owner is not None and hasattr(owner, "pinned"):
            return bool(owner.pinned)
    return False


def _destroy_handle(cublas, handle):
    try:
        cublas.destroy(handle)
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass


# ------------------------------------------------------------------------------ launching

def _launch(device, fn, grid, block, args, what):
    """A callable launching ``fn`` on the device's stream; nothing for empty grids."""
    if any(g == 0 for g in grid):
        return lambda: None
    grid, block, args = tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args)
    stream, lock, dev, errors = device.stream, device._lock, device._dev, device._errors[1]

    def run():
        try:
            with dev, lock:
                fn(grid, block, args, stream=stream)
        except errors as e:
            raise map_error(device, e, what) from None
    return run


def _launch_1d(ctx, program, name, n, args, what):
    return launch(ctx, program, name, n, args, what)


def _epilogue_args(attrs):
    return epilogue_args(attrs, "cuda")


def _ptr(buf):
    return buf.data.ptr


def gemm(device, m, n, k, a, lda, sa, b, ldb, sb, c, ldc, sc, count, what="gemm",
         precision="float32"):
    """A callable running row-major C[z] = A[z] @ B[z] for z < count on cuBLAS (a, b, c are
    (array, element offset) pairs; strides in elements) in ``precision`` (see GEMM_EX), on the
    device's handle (the direct or the CuPy path, see BLAS_PATHS)."""
    if m == 0 or n == 0 or count == 0:
        return lambda: None
    call = device._gemm_call(precision)
    (ab, ao), (bb, bo), (cb, co) = a, b, c
    item = ab.dtype.itemsize
    a_ptr, b_ptr, c_ptr = _ptr(ab) + item * ao, _ptr(bb) + item * bo, _ptr(cb) + item * co
    keep = (ab, bb, cb)
    stream, lock, dev, errors = device.stream, device._lock, device._dev, device._errors[1]

    def run():
        assert keep
        try:
            with dev, lock, stream:
                call(m, n, k, a_ptr, lda, sa, b_ptr, ldb, sb, c_ptr, ldc, sc, count)
        except errors as e:
            raise map_error(device, e, what) from e
    return run


def _epilogue(ctx, y, bias, residual, channels, inner, epi):
    """y = act(y + bias[channel] + residual) in place; nothing when it is the identity."""
    if bias is None and residual is None and int(epi[0]) == ACTIVATIONS["identity"]:
        return None
    total = y.size
    return _launch_1d(ctx, "elementwise.cl", "bias_act", total, (
        y, bias if bias is not None else NULL, residual if residual is not None else NULL,
        i32(total), i32(channels), i32(inner), *epi), "bias/activation epilogue")


# -------------------------------------------------------------------------------- builders

def build_dense(ctx, attrs, ins, out):
    device = ctx.device
    x, w = ins[0], ins[1]
    k, n = w.shape
    m = x.size // k if k else 0
    wb = ctx.weight(w)
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    residual = _operand(ctx, ins[3]) if len(ins) > 3 else None
    if m * n == 0:
        return lambda: None
    mult = gemm(device, m, n, k, (x, 0), k, 0, (wb, 0), n, 0, (out, 0), n, 0, 1, "dense",
                ctx.precision)
    return _sequence(mult, _epilogue(ctx, out, bias, residual, n, 1, _epilogue_args(attrs)))


def build_conv2d(ctx, attrs, ins, out):
    device = ctx.device
    x, w = ins[0], ins[1]
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    groups = attrs["groups"]
    _, _, oh, ow = out.shape
    (sh, sw), (pt, pl, _, _), (dh, dw) = attrs["strides"], attrs["pads"], attrs["dilations"]
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    residual = _operand(ctx, ins[3]) if len(ins) > 3 else None
    epi = _epilogue_args(attrs)
    p = oh * ow
    if n * m * p == 0:
        return lambda: None

    if groups == c and cg == 1 and m == c:  # depthwise: direct, epilogue fused
        wb = ctx.weight(w)
        total = n * m * p
        return _launch_1d(ctx, "conv.cl", "depthwise_conv", total, (
            x, wb, bias if bias is not None else NULL,
            residual if residual is not None else NULL, out, i32(total),
            i32(c), i32(h), i32(wd), i32(kh), i32(kw), i32(oh), i32(ow), i32(sh), i32(sw),
            i32(pt), i32(pl), i32(dh), i32(dw), *epi), "depthwise conv")

    mg = m // groups
    ckk = cg * kh * kw
    wb = ctx.weight(w)  # [M, CG, KH, KW] is [G, MG, CKK] row-major
    steps = []
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any(attrs["pads"]):
        src, batch_stride = x, c * p  # 1x1: the input image is already the [C, H*W] matrix
    else:
        cols = ctx.scratch((n, c * kh * kw, p))
        total = n * c * kh * kw * p
        steps.append(_launch_1d(ctx, "conv.cl", "im2col", total, (
            x, cols, i32(total), i32(c), i32(h), i32(wd), i32(kh), i32(kw), i32(oh),
            i32(ow), i32(sh), i32(sw), i32(pt), i32(pl), i32(dh), i32(dw)), "im2col"))
        src, batch_stride = cols, c * kh * kw * p
    # out[b, g] (MG x P) = W[g] (MG x CKK) @ src[b, g] (CKK x P): one strided-batched product
    # per group over the batch (the weights broadcast with stride 0)
    for g in range(groups):
        steps.append(gemm(device, mg, p, ckk, (wb, g * mg * ckk), ckk, 0,
                          (src, g * ckk * p), p, batch_stride, (out, g * mg * p), p, m * p, n,
                          "conv2d", ctx.precision))
    steps.append(_epilogue(ctx, out, bias, residual, m, p, epi))
    return _sequence(*steps)




def build_matmul(ctx, attrs, ins, out):
    """C[z] = A[z] @ B[z] for two run-time (or constant) operands, batch axes broadcast: one
    strided-batched cuBLAS product per outer batch index (two batch levels, _kernels.MatmulPlan)."""
    a, b = (_operand(ctx, v) for v in ins)
    plan = matmul_plan(a.shape, b.shape, out.shape)
    (outer, inner), (sa, sb, sc) = plan.batch, plan.strides
    m, n, k = plan.m, plan.n, plan.k
    return _sequence(*[gemm(ctx.device, m, n, k, (a, o * sa[0]), k, sa[1], (b, o * sb[0]), n,
                            sb[1], (out, o * sc[0]), n, sc[1], inner, "matmul", ctx.precision)
                       for o in range(outer)])


OPS = dict(SHARED, conv2d=build_conv2d, dense=build_dense, matmul=build_matmul)
assert set(OPS) == G.DEVICE_OPS
# gemm.cl is not used here (cuBLAS does the products); its GPU schedule still compiles as CUDA
# (tests/test_kernels_nvcc.py). Keep these in step with the OpenCL driver.
SOURCES = tuple(PROGRAMS)
GEMM_DEFINES = dict(GEMM_GPU)


# ------------------------------------------------------------------------------- discovery

def _cuda_error_text(e) -> str:
    """'cudaErrorNoDevice: no CUDA-capable device is detected' (CuPy's message keeps the
    error name first)."""
    text = str(e).strip()
    return text or type(e).__name__


def discover():
    try:
        import cupy
    except ImportError:
        return [DeviceInfo("cuda:0", False, reason=NO_CUPY)]
    except Exception as e:  # noqa: BLE001 - a broken CuPy install must not break discovery
        return [DeviceInfo("cuda:0", False, reason=f"CuPy failed to import: "
                           f"{type(e).__name__}: {e}")]
    try:
        from cupy_backends.cuda.api import runtime
        count = runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, old driver, no device
        return [DeviceInfo("cuda:0", False, reason=_cuda_error_text(e))]
    if count == 0:
        return [DeviceInfo("cuda:0", False,
                           reason="cudaErrorNoDevice: no CUDA-capable device is detected")]
    missing = ""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        missing = f"NVRTC is not usable ({type(e).__name__}: {e}); pip install " \
                  "'nvidia-cuda-nvrtc' or install the CUDA toolkit"
    if not missing:
        try:
            from cupy_backends.cuda.libs import cublas  # noqa: F401
        except Exception as e:  # noqa: BLE001
            missing = f"cuBLAS is not usable ({type(e).__name__}: {e}); pip install " \
                      "'nvidia-cublas' or install the CUDA toolkit"
    infos = []
    for index in range(count):
        spec = f"cuda:{index}"
        try:
            props = runtime.getDeviceProperties(index)
            name = props["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            name = f"{name} (sm_{props['major']}{props['minor']}, CuPy {cupy.__version__})"
        except Exception as e:  # noqa: BLE001
            infos.append(DeviceInfo(spec, False, reason=_cuda_error_text(e)))
            continue
        if missing:
            infos.append(DeviceInfo(spec, False, name, reason=missing))
        else:
            infos.append(DeviceInfo(spec, True, name,
                                    open=lambda i=index: CUDADevice(i)))
    return infos
