"""An EMULATION of the part of CuPy 14.2 (and libcublas) that ``drivers/cuda.py`` uses, for
running the CUDA driver on a machine without a GPU as ``cuda-emu:0``. Not CuPy; no GPU involved.

What is real: every kernel source is compiled by NVIDIA's NVRTC (the ``nvidia-cuda-nvrtc`` 13
wheel, or a CUDA toolkit's libnvrtc) with the options CuPy 14.2's ``RawModule`` adds
(:func:`cupy_nvrtc_options`), so a kernel that does not build for the GPU fails here as it would
there, with CuPy's ``CompileException`` and NVRTC's log. The same source is then compiled for the
host by g++ through ``kernels/dialect.h``'s CUDA side (``host.h`` supplies the CUDA built-ins)
and run over the launch grid: blocks one after another, threads as a loop, or as fibers in
barrier phases for kernels that call ``__syncthreads()``, ``__shared__`` memory per block,
denormals flushed as ``-ftz=true`` does.

What is checked, as CuPy or the GPU would (or stricter, where the GPU would silently misbehave):

* kernel arguments against the kernel's parameters parsed from the source, with CuPy's
  conversions (``function.pyx``: a CuPy array passes its pointer, a NumPy scalar its own size, a
  Python ``int`` 8 bytes, a ``float`` 8): count, kind (pointer / int / float) and size; a
  pointer must be null or point into this GPU's memory (:class:`EmulationError` otherwise);
  launch bounds (1024 threads per block, grid limits);
* device memory is separate from host memory: device blocks start filled with 0xCD bytes;
  NumPy cannot see a device array (``__array__`` raises TypeError as CuPy's does); host <-> device
  copies are stream operations;
* streams run lazily: work queued on a stream runs only when something waits for it (a stream or
  event synchronisation, a legacy-stream operation, a copy to pageable memory), so a missing
  wait between two streams reads stale data here instead of racing; copies from page-locked
  host memory read it when they run, copies from pageable memory when they are queued (as
  ``cudaMemcpyAsync`` does);
* cuBLAS (CuPy's wrappers and the C functions of libcublas through ctypes) is computed in NumPy
  with cuBLAS's argument checks (``CUBLAS_STATUS_INVALID_VALUE`` for bad sizes and leading
  dimensions) and every matrix checked to lie inside one device allocation (an access outside is
  ``cudaErrorIllegalAddress``, sticky, as on a GPU); float16/bfloat16 results rounded to
  nearest even, tf32 inputs rounded to 10 mantissa bits;
* graph capture as CuPy 14.2 and CUDA enforce it: no capture on the legacy stream, no stream or
  event synchronisation while capturing, no copy between pageable host memory and the device in
  a capture (each invalidates the capture: ``end_capture`` then fails), and CuPy's cuBLAS
  wrappers raising ``NotImplementedError('calling cuBLAS API during stream capture is currently
  unsupported')`` (``cupy_backends/cuda/libs/cublas.pyx``); a graph replays the captured work
  with the arguments baked in.

What only a GPU shows: the PTX/SASS actually running (only the host build of the same source
runs here), timing, occupancy and real concurrency, warp-level behaviour (no warp is emulated:
a kernel relying on lock-step warps or on one block's threads seeing each other's writes without
a barrier could pass here and fail there), out-of-bounds accesses inside kernels (not
instrumented), cuBLAS's own numerics and algorithm choice, NVRTC/driver version mismatches at
module load, page-locking, and CuPy's own behaviour outside what is written here.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import glob
import hashlib
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import weakref

import numpy as np

EMULATION = True
NAME = "CUDA emulation (NVRTC-checked kernels run on the host; no GPU)"
__version__ = "14.2.0 (offload emulation)"
_HERE = pathlib.Path(__file__).resolve().parent
ARCH = "90"                      # the emulated GPU: an H200-like sm_90
TOTAL_MEMORY = 141 << 30         # its memory (allocations beyond raise OutOfMemoryError)
FILL = 0xCD                      # fresh device memory
ALIGN = 512                      # CuPy's pool rounds blocks to 512 bytes
MAX_THREADS = 1024
STREAM_LEGACY, STREAM_PER_THREAD = 1, 2


# ------------------------------------------------------------------------------------ errors

class EmulationError(RuntimeError):
    """A rule of the emulation broken: something a GPU would do wrong silently or crash on
    (a kernel argument of the wrong kind or size, a pointer outside device memory, ...)."""


_RUNTIME_ERRORS = {
    1: ("cudaErrorInvalidValue", "invalid argument"),
    2: ("cudaErrorMemoryAllocation", "out of memory"),
    100: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    400: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
    700: ("cudaErrorIllegalAddress", "an illegal memory access was encountered"),
    900: ("cudaErrorStreamCaptureUnsupported",
          "operation not permitted when stream is capturing"),
    901: ("cudaErrorStreamCaptureInvalidated",
          "operation failed due to a previous error during capture"),
    904: ("cudaErrorStreamCaptureImplicit",
          "operation would make the legacy stream depend on a capturing blocking stream"),
    906: ("cudaErrorStreamCaptureWrongThread",
          "attempt to terminate a thread-local capture sequence from another thread"),
}


class CUDARuntimeError(RuntimeError):
    """As ``cupy_backends.cuda.api.runtime.CUDARuntimeError``: 'name: description'."""

    def __init__(self, status, detail=""):
        self.status = status
        name, text = _RUNTIME_ERRORS.get(status, (f"cudaError{status}", "unknown error"))
        super().__init__(f"{name}: {text}" + (f" [emulation: {detail}]" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.status,))


class CUDADriverError(RuntimeError):
    def __init__(self, status, text="CUDA_ERROR_UNKNOWN"):
        self.status = status
        super().__init__(text)


_CUBLAS_STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
                  3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
                  8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
                  13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
                  15: "CUBLAS_STATUS_NOT_SUPPORTED"}


class CUBLASError(RuntimeError):
    def __init__(self, status):
        self.status = status
        super().__init__(_CUBLAS_STATUS.get(status, f"CUBLAS_STATUS_{status}"))


class NVRTCError(RuntimeError):
    def __init__(self, status, text=""):
        self.status = status
        super().__init__(f"{text or 'NVRTC error'} ({status})")


class CompileException(Exception):
    """As ``cupy.cuda.compiler.CompileException``: str() is NVRTC's log."""

    def __init__(self, msg, source, name, options, backend="nvrtc"):
        self._msg, self.source, self.name, self.options, self.backend = \
            msg, source, name, options, backend
        super().__init__()

    def __str__(self):
        return self._msg

    def get_message(self):
        return self._msg


class OutOfMemoryError(MemoryError):
    def __init__(self, size, total, limit=0):
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: "
                         f"{total:,} bytes).")


# ------------------------------------------------------------------------------------ the GPU

class _Block:
    __slots__ = ("ptr", "size", "array")

    def __init__(self, size):
        self.array = np.full(max(size, 1) + ALIGN, FILL, np.uint8)
        base = self.array.ctypes.data
        self.ptr = base + (-base) % ALIGN
        self.size = size


class _GPU:
    """The one emulated device: memory, the sticky error, the lock that serialises execution."""

    def __init__(self):
        self.lock = threading.RLock()        # one piece of GPU work runs at a time
        self.starts: list[int] = []
        self.blocks: dict[int, _Block] = {}
        self.in_use = 0
        self.sticky: CUDARuntimeError | None = None
        self.pinned: list[tuple[int, int]] = []  # page-locked host ranges (start, end)
        self.streams: "weakref.WeakSet[Stream]" = weakref.WeakSet()
        self.counters = collections.Counter()

    # memory
    def allocate(self, size) -> _Block:
        with self.lock:
            if self.in_use + size > TOTAL_MEMORY:
                raise OutOfMemoryError(size, self.in_use)
            try:
                block = _Block(size)
            except MemoryError:
                raise OutOfMemoryError(size, self.in_use) from None
            bisect.insort(self.starts, block.ptr)
            self.blocks[block.ptr] = block
            self.in_use += size
            return block

    def release(self, block):
        with self.lock:
            if self.blocks.pop(block.ptr, None) is not None:
                self.starts.remove(block.ptr)
                self.in_use -= block.size

    def find(self, ptr, nbytes=1) -> _Block | None:
        """The allocation holding [ptr, ptr + nbytes), or None."""
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0:
            return None
        block = self.blocks[self.starts[i]]
        return block if ptr + max(nbytes, 0) <= block.ptr + block.size else None

    def device_bytes(self, ptr, nbytes, what) -> np.ndarray:
        """A uint8 view of device memory [ptr, ptr + nbytes); an access outside every
        allocation is the GPU's sticky cudaErrorIllegalAddress."""
        block = self.find(ptr, nbytes)
        if block is None:
            self.fault(f"{what}: {nbytes} bytes at {ptr:#x} are not inside one device "
                       "allocation")
        start = ptr - block.array.ctypes.data
        return block.array[start:start + nbytes]

    def fault(self, detail):
        self.sticky = CUDARuntimeError(700, detail)
        raise self.sticky

    def check(self):
        if self.sticky is not None:
            raise CUDARuntimeError(self.sticky.status, "sticky error from earlier work")

    def is_pinned(self, ptr, nbytes) -> bool:
        return any(s <= ptr and ptr + nbytes <= e for s, e in self.pinned)


_gpu = _GPU()


def counters() -> collections.Counter:
    """What the emulated GPU did: launches, gemms, copies by kind, graph launches, captures."""
    return _gpu.counters


def _host_bytes(ptr, nbytes) -> np.ndarray:
    """A uint8 view of host memory at ``ptr`` (an address the caller owns)."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


# ---------------------------------------------------------------------------------- streams

_ids = itertools.count(0x5000_0000, 0x100)
_tls = threading.local()


class _Capture:
    def __init__(self, stream, mode):
        self.stream, self.mode, self.ops, self.invalid = stream, mode, [], None
        self.thread = threading.get_ident()


class _BaseStream:
    def __init__(self, ptr, non_blocking):
        self.ptr = ptr
        self.non_blocking = non_blocking
        self._ops: collections.deque = collections.deque()
        self._queued = 0      # sequence number of the last op queued
        self._done = 0        # ... and of the last op run
        self._capture: _Capture | None = None
        _gpu.streams.add(self)

    # queueing and running
    def _enqueue(self, op, what):
        """Queue ``op`` (a callable running on the GPU); in a capture, add it to the graph."""
        _gpu.check()
        if self._capture is not None:
            self._capture.ops.append((op, what))
            return
        if self.ptr == 0 and _capturing_anywhere():
            raise CUDARuntimeError(904, f"{what} on the legacy stream during a capture")
        with _gpu.lock:
            self._queued += 1
            self._ops.append((self._queued, op, what))
        if self.ptr == 0:  # the legacy stream: what it is given runs now
            self._run_until(self._queued)

    def _run_until(self, seq):
        with _gpu.lock:
            while self._ops and self._ops[0][0] <= seq:
                n, op, what = self._ops.popleft()
                _gpu.check()
                try:
                    op()
                except CUDARuntimeError:
                    self._ops.clear()
                    raise
                self._done = n

    def _forbid_in_capture(self, what):
        cap = self._capture
        if cap is not None:
            cap.invalid = cap.invalid or what
            raise CUDARuntimeError(900, what)

    # CuPy's surface
    def synchronize(self):
        self._forbid_in_capture("Stream.synchronize() during capture")
        _gpu.check()
        self._run_until(self._queued)
        _gpu.check()

    def wait_event(self, event):
        if event._stream is None:
            return
        src, seq = event._stream, event._seq
        if event._capture is not None and event._capture is not self._capture:
            raise CUDARuntimeError(900, "waiting on an event recorded in another capture")

        def wait():
            src._run_until(seq)
        self._enqueue(wait, "wait_event")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def begin_capture(self, mode=None):
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self._capture is not None:
            raise CUDARuntimeError(1, "the stream is already capturing")
        self._capture = _Capture(self, runtime.streamCaptureModeRelaxed if mode is None
                                 else mode)
        _gpu.counters["captures"] += 1

    def end_capture(self):
        cap = self._capture
        if cap is None:
            raise CUDARuntimeError(1, "end_capture on a stream that is not capturing")
        if cap.thread != threading.get_ident() and cap.mode != runtime.streamCaptureModeRelaxed:
            raise CUDARuntimeError(906)
        self._capture = None
        if cap.invalid:
            raise CUDARuntimeError(901, cap.invalid)
        return Graph(cap.ops)

    def is_capturing(self):
        return self._capture is not None

    def __enter__(self):
        stack = _stream_stack()
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _stream_stack().pop()

    def use(self):
        _stream_stack()[:] = [self]
        return self


class Stream(_BaseStream):
    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        super().__init__(0 if null else next(_ids), non_blocking)


def _stream_stack() -> list:
    stack = getattr(_tls, "streams", None)
    if stack is None:
        stack = _tls.streams = []
    return stack


_null_stream = Stream(null=True)
Stream.null = _null_stream


def get_current_stream():
    stack = _stream_stack()
    return stack[-1] if stack else _null_stream


def _capturing_anywhere() -> bool:
    return any(s._capture is not None for s in list(_gpu.streams))


def _stream_of(ptr) -> _BaseStream:
    for s in list(_gpu.streams):
        if s.ptr == ptr or (ptr in (STREAM_LEGACY, STREAM_PER_THREAD) and s.ptr == 0):
            return s
    raise CUDARuntimeError(400, f"no stream {ptr:#x}")


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._stream, self._seq, self._capture = None, 0, None

    def record(self, stream=None):
        stream = stream or get_current_stream()
        _gpu.check()
        self._capture = stream._capture
        if stream._capture is not None:  # an event node of the graph
            stream._capture.ops.append((lambda: None, "event record"))
            self._stream, self._seq = stream, 0
            return
        event = self

        def mark():  # when the stream reaches the event (for get_elapsed_time)
            event._time = time.perf_counter()
        stream._enqueue(mark, "event record")
        self._stream, self._seq = stream, stream._queued

    def synchronize(self):
        if self._capture is not None:
            self._capture.invalid = self._capture.invalid or "Event.synchronize() on an event " \
                "recorded in a capture"
            raise CUDARuntimeError(900, "Event.synchronize() during capture")
        if self._stream is not None:
            self._stream._run_until(self._seq)
        _gpu.check()

    @property
    def done(self):
        return self._stream is None or self._stream._done >= self._seq


def get_elapsed_time(start, end) -> float:
    """Milliseconds between two completed events (emulated execution time on the host)."""
    start.synchronize()
    end.synchronize()
    return (end._time - start._time) * 1e3


class Graph:
    """A captured sequence: ``launch(stream)`` queues all of it on ``stream`` as one piece."""

    def __init__(self, ops):
        self._ops = tuple(ops)

    def launch(self, stream=None):
        stream = stream or get_current_stream()
        ops = self._ops

        def run():
            for op, _ in ops:
                op()
        _gpu.counters["graph_launches"] += 1
        stream._enqueue(run, "graph launch")

    def upload(self, stream=None):
        _gpu.check()


# ----------------------------------------------------------------------------------- memory

class Memory:
    def __init__(self, size):
        self._block = _gpu.allocate(size)
        self.ptr, self.size = self._block.ptr, size
        self.device_id = 0
        weakref.finalize(self, _gpu.release, self._block)


class MemoryPointer:
    """As ``cupy.cuda.MemoryPointer``: a device address with the copies CuPy offers."""

    def __init__(self, mem, offset):
        self.mem, self.ptr, self.device_id = mem, mem.ptr + offset, 0

    def __int__(self):
        return self.ptr

    def _copy_in(self, src_ptr, size, stream, what):
        stream = stream or get_current_stream()
        dst = _gpu.device_bytes(self.ptr, size, what)
        if _gpu.is_pinned(src_ptr, size):
            _gpu.counters["h2d_pinned"] += 1

            def op():
                dst[:] = _host_bytes(src_ptr, size)
        else:  # pageable: the source is consumed now (cudaMemcpyAsync stages it)
            stream._forbid_in_capture(f"{what} from pageable host memory during capture")
            stream.synchronize()
            data = _host_bytes(src_ptr, size).copy()
            _gpu.counters["h2d_pageable"] += 1

            def op():
                dst[:] = data
        stream._enqueue(op, what)

    def copy_from_host_async(self, mem, size, stream=None):
        self._copy_in(int(mem), size, stream, "copy_from_host_async")

    def copy_from_host(self, mem, size):
        self._copy_in(int(mem), size, _null_stream, "copy_from_host")

    def copy_to_host_async(self, mem, size, stream=None):
        stream = stream or get_current_stream()
        dst_ptr = int(mem)
        src = _gpu.device_bytes(self.ptr, size, "copy_to_host_async")
        pinned = _gpu.is_pinned(dst_ptr, size)
        if not pinned:
            stream._forbid_in_capture("copy_to_host_async to pageable host memory during "
                                      "capture")
        _gpu.counters["d2h_pinned" if pinned else "d2h_pageable"] += 1

        def op():
            _host_bytes(dst_ptr, size)[:] = src
        stream._enqueue(op, "copy_to_host_async")
        if not pinned:  # to pageable memory the call returns once the copy is done
            stream.synchronize()

    def copy_to_host(self, mem, size):
        self.copy_to_host_async(mem, size, _null_stream)
        _null_stream.synchronize()

    def copy_from_device_async(self, src, size, stream=None):
        stream = stream or get_current_stream()
        dst = _gpu.device_bytes(self.ptr, size, "copy_from_device_async")
        srcb = _gpu.device_bytes(int(src.ptr) if hasattr(src, "ptr") else int(src), size,
                                 "copy_from_device_async")

        def op():
            dst[:] = srcb
        stream._enqueue(op, "copy_from_device_async")

    def memset_async(self, value, size, stream=None):
        stream = stream or get_current_stream()
        dst = _gpu.device_bytes(self.ptr, size, "memset_async")

        def op():
            dst[:] = value
        stream._enqueue(op, "memset_async")


def alloc(nbytes) -> MemoryPointer:
    return MemoryPointer(Memory(int(nbytes)), 0)


def _unpin(span):
    try:
        _gpu.pinned.remove(span)
    except ValueError:
        pass


def alloc_pinned_memory(nbytes) -> np.ndarray:
    """Page-locked host memory (as ``cupy.cuda.alloc_pinned_memory``'s, which np.frombuffer
    views): a uint8 NumPy array whose address range is registered as page-locked with the
    emulated GPU for as long as the array (NumPy keeps it as the base of every view) lives."""
    array = np.empty(max(int(nbytes), 1), np.uint8)
    span = (array.ctypes.data, array.ctypes.data + array.nbytes)
    _gpu.pinned.append(span)
    weakref.finalize(array, _unpin, span)
    return array


# ---------------------------------------------------------------------------------- ndarray

class ndarray:
    """A C-contiguous array in emulated device memory (CuPy's ``ndarray``, the part used)."""

    def __init__(self, shape, dtype=np.float32, memptr=None):
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.size = int(np.prod(shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.data = memptr if memptr is not None else alloc(self.nbytes)
        if self.nbytes and _gpu.find(self.data.ptr, self.nbytes) is None:
            raise EmulationError(f"ndarray {shape} {self.dtype}: memptr {self.data.ptr:#x} "
                                 f"does not hold {self.nbytes} bytes")

    ndim = property(lambda self: len(self.shape))
    strides = property(lambda self: tuple(
        int(np.prod(self.shape[i + 1:], dtype=np.int64)) * self.dtype.itemsize
        for i in range(len(self.shape))))
    device = property(lambda self: Device(0))

    def _view(self) -> np.ndarray:
        """The device bytes as a NumPy array: for the emulation's own GPU-side work only."""
        raw = _gpu.device_bytes(self.data.ptr, self.nbytes, "array access")
        return raw.view(self.dtype).reshape(self.shape)

    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = list(shape)
        if -1 in shape:
            k = shape.index(-1)
            rest = int(np.prod([d for i, d in enumerate(shape) if i != k], dtype=np.int64))
            shape[k] = self.size // rest if rest else 0
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape "
                             f"{tuple(shape)}")
        return ndarray(shape, self.dtype, self.data)

    def copy(self):
        out = ndarray(self.shape, self.dtype)
        if self.nbytes:
            out.data.copy_from_device_async(self.data, self.nbytes)
        return out

    def get(self, stream=None):
        out = np.empty(self.shape, self.dtype)
        stream = stream or get_current_stream()
        if self.nbytes:
            self.data.copy_to_host_async(out.ctypes.data, self.nbytes, stream)
        stream.synchronize()
        return out

    def set(self, array, stream=None):
        array = np.ascontiguousarray(array, self.dtype)
        if array.nbytes != self.nbytes:
            raise ValueError("shape mismatch")
        self.data.copy_from_host_async(array.ctypes.data, self.nbytes,
                                       stream or get_current_stream())

    def astype(self, dtype):
        """A converted copy, computed on the device on the current stream."""
        out = ndarray(self.shape, dtype)
        if self.size:
            _elementwise("astype", out, self)
        return out

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """CuPy 14.2's stream handshake: the consumer's stream waits on CuPy's current one."""
        current = get_current_stream()
        consumer = STREAM_LEGACY if stream is None else stream
        if not isinstance(consumer, int) or consumer < -1:
            raise ValueError(f"On CUDA, the valid stream for the DLPack protocol is -1, 1, 2, "
                             f"or any larger value, but {stream} was provided")
        current_ptr = current.ptr or STREAM_LEGACY
        if consumer >= 0 and consumer != current_ptr:
            _stream_of(consumer).wait_event(current.record())
        return _Capsule(self)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"<emulated cupy.ndarray {self.shape} {self.dtype}>"


class _Capsule:
    """What ``__dlpack__`` hands a consumer here (a real capsule needs the C ABI)."""

    def __init__(self, array):
        self.array = array


def _elementwise(what, dst, *srcs, fn=None):
    """Queue a NumPy computation over device arrays on the current stream."""
    stream = get_current_stream()

    def op():
        out = dst._view()
        ins = [s._view() for s in srcs]
        out[...] = fn(*ins) if fn else ins[0]
    _gpu.counters["elementwise"] += 1
    stream._enqueue(op, what)


def empty(shape, dtype=np.float32):
    return ndarray(shape, dtype)


def full(shape, value, dtype=np.float32):
    out = ndarray(shape, dtype)
    stream = get_current_stream()

    def op():
        out._view()[...] = value
    stream._enqueue(op, "full")
    return out


def zeros(shape, dtype=np.float32):
    return full(shape, 0, dtype)


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.ascontiguousarray(a, dtype=dtype)
    out = ndarray(host.shape, host.dtype)
    if host.nbytes:
        out.data.copy_from_host_async(host.ctypes.data, host.nbytes, get_current_stream())
    return out


def asnumpy(a, stream=None):
    return a.get(stream) if isinstance(a, ndarray) else np.asarray(a)


def copyto(dst, src, casting="same_kind"):
    if not isinstance(dst, ndarray) or not isinstance(src, ndarray):
        raise TypeError(f"copyto: expected cupy arrays, got {type(dst).__name__} and "
                        f"{type(src).__name__}")
    np.broadcast_shapes(dst.shape, src.shape)
    if not np.can_cast(src.dtype, dst.dtype, casting):
        raise TypeError(f"Cannot cast from {src.dtype} to {dst.dtype}")
    _elementwise("copyto", dst, src)


def from_dlpack(x, *, device=None, copy=None):
    """CuPy as the consumer: the producer is handed CuPy's current stream."""
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"from_dlpack: {type(x).__name__} has no __dlpack__")
    ptr = get_current_stream().ptr or STREAM_LEGACY
    capsule = x.__dlpack__(stream=ptr)
    if not isinstance(capsule, _Capsule):
        raise EmulationError(f"from_dlpack: the emulation takes only its own arrays, got "
                             f"{type(x).__name__}")
    return capsule.array


# ---------------------------------------------------------------------------------- devices

class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError(101 if False else 1, f"device {self.id}: the emulation has "
                                   "one GPU")
        self.compute_capability = ARCH

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def use(self):
        return self

    def synchronize(self):
        for s in list(_gpu.streams):
            s.synchronize()


def _properties(index):
    if index != 0:
        raise CUDARuntimeError(1, f"device {index}")
    return {"name": b"NVIDIA H200 (offload emulation)", "major": 9, "minor": 0,
            "totalGlobalMem": TOTAL_MEMORY, "sharedMemPerBlock": 48 << 10,
            "maxThreadsPerBlock": MAX_THREADS, "multiProcessorCount": 132,
            "maxGridSize": (2 ** 31 - 1, 65535, 65535),
            "maxThreadsDim": (1024, 1024, 64)}


class _PointerAttributes:
    def __init__(self, ptr):
        self.device, self.devicePointer, self.hostPointer = 0, 0, 0
        if _gpu.find(ptr) is not None:
            self.type, self.devicePointer = 2, ptr      # cudaMemoryTypeDevice
        elif _gpu.is_pinned(ptr, 1):
            self.type, self.hostPointer, self.devicePointer = 1, ptr, ptr  # cudaMemoryTypeHost
        else:
            self.type = 0                                # cudaMemoryTypeUnregistered


def _stream_is_capturing(ptr):
    return _stream_of(ptr).is_capturing()


runtime = types.SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError,
    getDeviceCount=lambda: 1,
    getDeviceProperties=_properties,
    runtimeGetVersion=lambda: 13000,
    driverGetVersion=lambda: 13000,
    pointerGetAttributes=lambda ptr: _PointerAttributes(int(ptr)),
    streamIsCapturing=_stream_is_capturing,
    streamCaptureModeGlobal=0, streamCaptureModeThreadLocal=1, streamCaptureModeRelaxed=2,
    streamLegacy=STREAM_LEGACY, streamPerThread=STREAM_PER_THREAD,
    is_hip=False, _is_hip_environment=False,
    memoryTypeUnregistered=0, memoryTypeHost=1, memoryTypeDevice=2,
)
driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)

from . import _blas, _kernels  # noqa: E402  (they use the classes above)

cublas = _blas.cupy_cublas()
nvrtc = types.SimpleNamespace(NVRTCError=NVRTCError, getVersion=_kernels.nvrtc_version)
RawModule = _kernels.RawModule
cupy_nvrtc_options = _kernels.cupy_nvrtc_options
libcublas = _blas.libcublas

float32, float16, float64, int32 = np.float32, np.float16, np.float64, np.int32

cuda = types.SimpleNamespace(
    Device=Device, Stream=Stream, Event=Event, Graph=Graph, alloc=alloc,
    alloc_pinned_memory=alloc_pinned_memory, MemoryPointer=MemoryPointer,
    get_current_stream=get_current_stream, get_elapsed_time=get_elapsed_time,
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, MemoryPointer=MemoryPointer),
    compiler=types.SimpleNamespace(CompileException=CompileException),
    runtime=runtime,
)


def reset():
    """Clear the sticky error (a fresh process on a real GPU), for tests that provoke one."""
    _gpu.sticky = None
