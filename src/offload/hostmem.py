"""Host memory from the C++ extension ``offload._core``: 4 KiB-aligned blocks as NumPy arrays.

Every array made here is a view of a :class:`HostBuffer` (``array.base.obj``), which owns the
memory: the block lives while any array, view or DLPack consumer (``np.from_dlpack``,
``torch.from_dlpack``) still refers to it. A pinned block is page-locked through the CUDA runtime,
which is loaded at run time (``libcudart.so``, ``.so.13``, ``.so.12``, a pip ``nvidia-*`` wheel's
copy, or the path in ``$OFFLOAD_CUDART``); offload never links against CUDA.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import threading

import numpy as np

from ._core import ALIGNMENT, HostBuffer, address
from ._core import aligned_empty as _aligned_empty
from ._core import copy as _copy
from ._core import load_cuda_runtime as _load_cuda_runtime
from .errors import DeviceMemoryError, DeviceUnavailableError, ShapeError

__all__ = ["ALIGNMENT", "HostBuffer", "address", "aligned_empty", "buffer", "copy",
           "cuda_runtime", "empty"]

# Device kinds whose copies run faster from page-locked memory; empty(device=...) pins for them
# when a CUDA runtime can page-lock here, and quietly gives plain aligned memory otherwise.
_PINNED_KINDS = frozenset({"cuda"})

_typestrs: dict = {}  # dtype argument -> NumPy typestr HostBuffer takes, or None (byte fallback)
_cuda_lock = threading.Lock()
_cuda_state: str | DeviceUnavailableError | None = None  # loaded path, or why not; None: untried
_pin_failure: str | None = None  # why page-locking failed once with a loaded runtime


def physical_memory() -> int:
    """Bytes of physical memory of this machine (0 where the system does not say)."""
    global _physical
    if _physical is None:
        try:
            _physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            _physical = 0
    return _physical


_physical: int | None = None


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def _refuse(nbytes: int, what: str) -> DeviceMemoryError:
    """The error for a host allocation that failed (_core refuses more than the physical
    memory before asking: with overcommit, malloc would promise it and the process would be
    killed on touching it)."""
    phys = physical_memory()
    have = f"; this machine has {_size(phys)} of physical memory" if phys else ""
    return DeviceMemoryError(f"host memory: cannot allocate {_size(nbytes)} for {what}{have}")


def aligned_empty(nbytes: int) -> np.ndarray:
    """A writeable uint8 array of ``nbytes`` whose data starts on a 4 KiB boundary.

    More than the machine's physical memory, or an allocation that fails, raises
    :class:`~offload.errors.DeviceMemoryError` naming the size."""
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ShapeError(f"aligned_empty(): expected a byte count >= 0, got {nbytes}")
    try:
        return _aligned_empty(nbytes, ALIGNMENT)
    except MemoryError:
        raise _refuse(nbytes, "an aligned block") from None


def buffer(shape, typestr: str = "<f4", pinned: bool = False) -> HostBuffer:
    """A :class:`HostBuffer` of ``shape`` elements of ``typestr``; like :func:`empty`, a size
    over the physical memory or a failed allocation raises DeviceMemoryError naming it."""
    try:
        return HostBuffer(shape, typestr, pinned)
    except MemoryError:
        raise _refuse(_nbytes(shape, typestr), f"an array of shape {_shape_text(shape)} "
                      f"({typestr})") from None


def empty(shape, dtype=np.float32, device=None, pinned: bool = False) -> np.ndarray:
    """An uninitialised, 4 KiB-aligned, C-contiguous array of ``shape`` and ``dtype``.

    Devices read such an array in place where they can (the CPU device directly, OpenCL through
    ``CL_MEM_USE_HOST_PTR``, XRT buffer objects), so a model input made here is not copied.

    ``pinned=True`` page-locks the memory through the CUDA runtime (fast, asynchronous
    host-to-GPU copies); without a loadable CUDA runtime, or when it cannot page-lock (no GPU,
    old driver), it raises :class:`~offload.errors.DeviceUnavailableError` with the reason, never
    handing out unpinned memory instead. ``device`` (a spec such as ``"cuda:0"`` or a
    :class:`~offload.Device`) lets the device choose: page-locked for ``cuda`` devices when the
    runtime can page-lock here, plain aligned memory otherwise (and for cpu, opencl, xrt).

    The array's ``base.obj`` is its :class:`HostBuffer` (buffer protocol and DLPack; DLPack
    device kDLCUDAHost when pinned). Cost: about a microsecond, like a small ``np.empty`` plus a
    ``malloc``.
    """
    if device is not None:
        wants = _device_wants_pinned(device)  # also checks that the device is known
        pinned = pinned or wants
    if pinned:
        _require_cuda_runtime()
    shape = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        typestr = _typestrs.get(dtype, False) if _hashable(dtype) else False
        if typestr is False:
            typestr = _typestr(dtype)
        if typestr is not None:
            return np.asarray(HostBuffer(shape, typestr, pinned))
        # dtypes the buffer protocol cannot spell natively (structured, datetime, big-endian,
        # strings): a byte block viewed as the dtype
        dt = np.dtype(dtype)
        shape = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                   for d in shape):
            raise ValueError("shape entries must be ints >= 0")
        count = math.prod(int(d) for d in shape)
        block = np.asarray(HostBuffer((count * dt.itemsize,), "|u1", pinned))
        return block.view(dt).reshape(shape)
    except MemoryError:  # also std::bad_alloc: a size that does not fit in memory at all
        raise _refuse(_nbytes(shape, dtype), f"offload.empty({_shape_text(shape)}, "
                      f"{np.dtype(dtype)})") from None
    except RuntimeError as e:  # page-locking failed: the runtime is there, the GPU is not
        raise DeviceUnavailableError(f"offload.empty(pinned=True): expected page-locked memory "
                                     f"from the CUDA runtime {_cuda_state}, got: {e}") from None
    except (ValueError, TypeError) as e:
        raise ShapeError(f"offload.empty(): expected a shape of non-negative ints and a NumPy "
                         f"dtype, got shape={shape!r}, dtype={dtype!r}: {e}") from None


def copy(dst, src) -> None:
    """Copy ``src`` into ``dst`` with one native memmove (the GIL released from 64 KiB).

    Both must be C-contiguous host buffers (NumPy arrays, :class:`HostBuffer`, memoryviews) of
    the same size in bytes, ``dst`` writeable; otherwise :class:`~offload.errors.ShapeError`.
    Other threads keep running Python while a large copy is under way.
    """
    try:
        _copy(dst, src)
    except (TypeError, ValueError) as e:
        raise ShapeError(str(e)) from None


def cuda_runtime() -> str:
    """Path of the CUDA runtime library used to page-lock memory, loading it on first use.

    Raises :class:`~offload.errors.DeviceUnavailableError` naming every library tried when none
    loads (the answer is remembered for the process).
    """
    return _require_cuda_runtime()


# -- helpers -----------------------------------------------------------------------------------
def _nbytes(shape, dtype) -> int:
    """Bytes of ``shape`` elements of ``dtype`` (0 for what is not a shape: refused later)."""
    try:
        return math.prod(map(int, shape)) * np.dtype(dtype).itemsize
    except (TypeError, ValueError, OverflowError):
        return 0


def _shape_text(shape) -> str:
    try:
        return str(tuple(int(d) for d in shape))
    except (TypeError, ValueError):
        return repr(shape)


def _hashable(dtype) -> bool:
    return dtype.__hash__ is not None


def _typestr(dtype) -> str | None:
    dt = np.dtype(dtype)  # raises TypeError for what is not a dtype
    if dt.hasobject:
        raise TypeError(f"object dtype {dt} cannot live in raw host memory")
    ok = dt.kind in "biufc" and dt.byteorder in "=|<" and not dt.fields and dt.shape == ()
    typestr = dt.str if ok and sys.byteorder == "little" else None
    if _hashable(dtype) and len(_typestrs) < 256:
        _typestrs[dtype] = typestr
    return typestr


def _device_wants_pinned(device) -> bool:
    from .device import Device, parse_spec, resolve_spec  # no import cycle at module load
    if not isinstance(device, Device):
        if not isinstance(device, str):
            raise DeviceUnavailableError(f"offload.empty(device=...): expected a device spec "
                                         f"such as 'cuda:0' or an offload.Device, got "
                                         f"{type(device).__name__} {device!r}")
        # a device nobody has is refused; known but unavailable (no GPU here): plain memory
        device = resolve_spec(device)
    kind = parse_spec(device).partition(":")[0]
    if kind not in _PINNED_KINDS or _pin_failure is not None:
        return False
    try:
        _require_cuda_runtime()
    except DeviceUnavailableError:
        return False
    return _can_pin()


def _can_pin() -> bool:
    """Whether a one-page registration works (checked once: no GPU or an old driver fail it)."""
    global _pin_failure
    try:
        HostBuffer((1,), "|u1", True)
        return True
    except RuntimeError as e:
        _pin_failure = str(e)
        return False


def _cuda_candidates() -> list[str]:
    names = [os.environ["OFFLOAD_CUDART"]] if os.environ.get("OFFLOAD_CUDART") else []
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for entry in sys.path:  # pip wheels (nvidia-cuda-runtime-cu12, nvidia-cuda-runtime 13)
        names += sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*", "lib",
                                               "libcudart.so*")))
    return names


def _require_cuda_runtime() -> str:
    global _cuda_state
    state = _cuda_state
    if state is None:
        with _cuda_lock:
            if _cuda_state is None:
                try:
                    _cuda_state = _load_cuda_runtime(_cuda_candidates())
                except RuntimeError as e:
                    _cuda_state = DeviceUnavailableError(
                        f"page-locked (pinned) host memory needs the CUDA runtime: {e}")
            state = _cuda_state
    if isinstance(state, DeviceUnavailableError):
        raise DeviceUnavailableError(*state.args)
    return state
