"""The OpenCL device on pyopencl: builds the kernel sources of ``offload/kernels``.

One context and one in-order queue per device. Kernel sources are written once in the dialect of
``kernels/dialect.h`` (OpenCL C 1.2 and CUDA C++); they are read from the package by path, their
``#include "..."`` lines expanded here (with ``#line`` markers, so compiler messages name the real
file and line), and each program is built once per device and kept in a disk cache of program
binaries keyed by source hash, device, driver version and build options
(``$OFFLOAD_CACHE/opencl`` or ``~/.cache/offload/opencl``).

Op builders set every kernel argument at plan-build time; the per-inference callable only
enqueues. Activations are NCHW float32 buffers at offset 0 of their blocks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import weakref
from pathlib import Path

import numpy as np

from .. import graph as G
from ..device import ALL_DTYPES, Capabilities, Device, DeviceInfo
from ..hostmem import ALIGNMENT, address
from ._builders import SHARED, epilogue_args, launch
from ._kernels import (GEMM_CPU, GEMM_GPU, KERNEL_DIR, PROGRAMS,  # noqa: F401
                       _operand, _sequence, kernel_source, matmul_plan)
from ..errors import (DeviceMemoryError, DeviceRuntimeError, KernelBuildError,
                      UnsupportedOpError)

_log = logging.getLogger("offload.opencl")

DRIVER_VERSION = "1"
LOCAL_1D = 64  # work-group size of the one-dimensional kernels (fixed: PoCL compiles per size)


i32, f32 = np.int32, np.float32


# ------------------------------------------------------------------------------------- sources





def cache_dir() -> Path:
    root = os.environ.get("OFFLOAD_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "offload"
    return base / "opencl"


def options_string(defines: dict) -> str:
    parts = ["-cl-mad-enable", "-cl-std=CL1.2"]
    for k, v in sorted(defines.items()):
        parts.append(f"-D{k}={v}")
    return " ".join(parts)


_LOG_LOCATION = re.compile(r'([\w.\-/]+\.(?:cl|h)):(\d+):')


def failing_line(log: str, source: str) -> str:
    """'file:line: <source text>' of the first error the compiler log names, or ''. Lines are
    looked up in ``source`` through its ``#line`` markers (so includes resolve to their file)."""
    errors = [line for line in log.splitlines() if "error" in line]
    m = next((m for m in map(_LOG_LOCATION.search, errors) if m), None)
    if not m:
        return ""
    name, number = Path(m.group(1)).name, int(m.group(2))
    lines, current, line = {}, "", 1
    for text in source.splitlines():
        marker = _LINE_MARKER.match(text)
        if marker:
            line, current = int(marker.group(1)), Path(marker.group(2)).name
            continue
        lines[(current, line)] = text
        line += 1
    return f"{name}:{number}: {lines.get((name, number), '').strip()}"


_LINE_MARKER = re.compile(r'^\s*#\s*line\s+(\d+)\s+"([^"]*)"')


# ---------------------------------------------------------------------------------- errors

def _cl():
    import pyopencl as cl
    return cl


def _is_memory_error(cl, e) -> bool:
    if isinstance(e, (cl.MemoryError, MemoryError)):
        return True
    codes = {cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE, cl.status_code.OUT_OF_RESOURCES,
             cl.status_code.OUT_OF_HOST_MEMORY}
    try:
        return int(e.code) in codes
    except (AttributeError, TypeError, ValueError):
        return False


def map_error(device, e, what: str):
    """The typed offload error for a pyopencl error raised while doing ``what``."""
    cl = _cl()
    if _is_memory_error(cl, e):
        return DeviceMemoryError(f"{device.spec}: out of device memory while {what} "
                                 f"({device.bytes_in_use} bytes in use): {e}")
    return DeviceRuntimeError(f"{device.spec}: {what} failed: {e}")


# ---------------------------------------------------------------------------------- memory

class Raw:
    """A device memory block. ``uses`` lists the (kernel, argument index) pairs that read it, so
    that a plan input can be pointed at the caller's own host memory (``bound``) for one call."""

    __slots__ = ("mem", "nbytes", "uses", "bound", "__weakref__")

    def __init__(self, mem, nbytes):
        self.mem, self.nbytes = mem, nbytes
        self.uses: list = []
        self.bound = None  # a USE_HOST_PTR cl.Buffer the kernels read instead of mem, kept alive

    @property
    def current(self):
        return self.bound if self.bound is not None else self.mem


class Buffer:
    """A typed view of a device block: cl.Buffer, shape, dtype, offset (always 0 here)."""

    __slots__ = ("mem", "shape", "dtype", "offset", "raw")

    def __init__(self, raw: Raw, shape, dtype=np.float32):
        self.raw, self.mem = raw, raw.mem
        self.shape, self.dtype, self.offset = tuple(int(d) for d in shape), np.dtype(dtype), 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(self.size // known if d == -1 else d for d in shape)
        assert math.prod(shape) == self.size, (shape, self.shape)
        return Buffer(self.raw, shape, self.dtype)

    def __repr__(self):
        return f"<opencl Buffer {self.shape} {self.dtype.name}>"


# ---------------------------------------------------------------------------------- device

class OpenCLDevice(Device):
    """One OpenCL device: a context, an in-order queue, the built programs."""

    kind = "opencl"

    def __init__(self, index: int, cl_device):
        cl = _cl()
        self.index = index
        self.cl_device = cl_device
        platform = cl_device.platform
        self.name = (f"{platform.name.strip()} ({_short_version(platform.version.strip())}) / "
                     f"{cl_device.name.strip()}")
        self.is_cpu = bool(cl_device.type & cl.device_type.CPU)
        try:
            self.context = cl.Context([cl_device])
            self.queue = cl.CommandQueue(self.context, cl_device)
        except cl.Error as e:
            raise map_error(self, e, "creating the context") from None
        self.extensions = set(cl_device.extensions.split())
        self.has_fp16 = "cl_khr_fp16" in self.extensions
        self.max_alloc = int(cl_device.max_mem_alloc_size)
        self.global_mem = int(cl_device.global_mem_size)
        self.gemm_config = dict(GEMM_CPU if self.is_cpu else GEMM_GPU)
        self._programs: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self._in_use = 0
        self._raws: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        # host memory is device memory (PoCL, integrated GPUs): aligned inputs are used in place
        self.zero_copy = self.is_cpu or bool(getattr(cl_device, "host_unified_memory", False))
        self.ops = OPS
        # float16/bfloat16: half-size tensors in memory, float arithmetic (vload_half is core
        # OpenCL 1.2: no cl_khr_fp16 needed)
        self.capabilities = Capabilities(frozenset(OPS), dtypes=ALL_DTYPES,
                                         precisions=frozenset({"float32", "float16", "bfloat16"}))
        self.build_stats = {"compiled": 0, "from_disk": 0, "seconds": 0.0}
        self._announced = False

    # -- memory ---------------------------------------------------------------------------
    @property
    def bytes_in_use(self) -> int:
        return self._in_use

    def _release(self, nbytes):
        self._in_use -= nbytes

    def alloc(self, nbytes: int) -> Raw:
        cl = _cl()
        nbytes = max(int(nbytes), 4)
        if nbytes > self.max_alloc:
            raise DeviceMemoryError(f"{self.spec}: cannot allocate {nbytes} bytes: larger than the "
                                    f"device's largest block ({self.max_alloc} bytes); "
                                    f"{self._in_use} bytes in use")
        if self._in_use + nbytes > self.global_mem:
            # checked here: PoCL aborts the process on an allocation it cannot serve
            raise DeviceMemoryError(f"{self.spec}: cannot allocate {nbytes} bytes: "
                                    f"{self._in_use} bytes are in use of the device's "
                                    f"{self.global_mem} bytes of global memory")
        try:
            mem = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes)
        except (cl.Error, MemoryError) as e:
            raise DeviceMemoryError(f"{self.spec}: cannot allocate {nbytes} bytes "
                                    f"({self._in_use} bytes in use): {e}") from None
        raw = Raw(mem, nbytes)
        self._raws[mem.int_ptr] = raw
        self._in_use += nbytes
        weakref.finalize(raw, self._release, nbytes)
        return raw

    def view(self, raw: Raw, shape, dtype=np.float32) -> Buffer:
        return Buffer(raw, shape, dtype)

    def upload(self, array: np.ndarray) -> Buffer:
        array = np.ascontiguousarray(array, dtype=np.float32 if array.dtype == np.float64 else None)
        buf = Buffer(self.alloc(array.nbytes), array.shape, array.dtype)
        self.copy_in(buf, array)
        return buf

    def copy_in(self, dst: Buffer, src: np.ndarray) -> int:
        """Copy ``src`` into the plan input ``dst``; or, when ``src`` is a C-contiguous,
        4 KiB-aligned array of the right type on a device that shares host memory, point the
        kernels that read ``dst`` at ``src`` itself (CL_MEM_USE_HOST_PTR): 0 bytes copied."""
        if src.nbytes and self.zero_copy and self._bind(dst.raw, src, dst):
            return 0
        if dst.raw.bound is not None:
            self._rebind(dst.raw, None)
        src = np.ascontiguousarray(src, dtype=dst.dtype)
        if src.nbytes == 0:
            return 0
        try:
            _cl().enqueue_copy(self.queue, dst.mem, src, is_blocking=True)
        except _cl().Error as e:
            raise map_error(self, e, "copying in") from None
        return src.nbytes

    def _bind(self, raw: Raw, src: np.ndarray, dst: Buffer) -> bool:
        if (src.dtype != dst.dtype or not src.flags.c_contiguous or src.nbytes != dst.nbytes
                or dst.nbytes != raw.nbytes  # a view of the first rows: kernels read it all
                or address(src) % ALIGNMENT or not raw.uses):
            return False
        cl = _cl()
        try:
            mem = cl.Buffer(self.context, cl.mem_flags.READ_ONLY | cl.mem_flags.USE_HOST_PTR,
                            hostbuf=src)
        except cl.Error:
            return False
        self._rebind(raw, mem)
        return True

    @staticmethod
    def _rebind(raw: Raw, mem) -> None:
        target = mem if mem is not None else raw.mem
        for kernel, index in raw.uses:
            kernel.set_arg(index, target)
        raw.bound = mem

    def note_uses(self, kernel, args) -> None:
        """Record which kernel arguments read which blocks (see Raw.uses)."""
        for index, arg in enumerate(args):
            raw = self._raws.get(getattr(arg, "int_ptr", None))
            if raw is not None:
                raw.uses.append((kernel, index))

    def device_array(self, src: Buffer):
        """A new ``pyopencl.array.Array`` on this device holding a copy of ``src``."""
        import pyopencl.array as cla
        cl = _cl()
        try:
            out = cla.empty(self.queue, src.shape, src.dtype)
            if src.nbytes:
                cl.enqueue_copy(self.queue, out.data, src.raw.current, byte_count=src.nbytes)
            self.queue.finish()
        except cl.Error as e:
            raise map_error(self, e, "copying an output on the device") from None
        return out

    def copy_out(self, dst: np.ndarray, src: Buffer) -> int:
        if dst.nbytes == 0:
            return 0
        host = dst if dst.flags.c_contiguous and dst.dtype == src.dtype else \
            np.empty(src.shape, src.dtype)
        try:
            _cl().enqueue_copy(self.queue, host, src.raw.current, is_blocking=True)
        except _cl().Error as e:
            raise map_error(self, e, "copying out") from None
        if host is not dst:
            np.copyto(dst, host.reshape(dst.shape))
        return dst.nbytes

    def synchronize(self) -> None:
        try:
            self.queue.finish()
        except _cl().Error as e:
            raise map_error(self, e, "running the queue") from None

    # -- programs -------------------------------------------------------------------------
    def program_key(self, source: str, options: str) -> str:
        d = self.cl_device
        ident = "\0".join([source, d.platform.name, d.platform.version, d.name, d.version,
                           d.driver_version, DRIVER_VERSION, options])
        return hashlib.sha256(ident.encode()).hexdigest()

    def program(self, name: str, defines: dict | None = None, source: str | None = None):
        """The built program of kernels/<name> (or of ``source``) for this device: from this
        process's table, else the disk cache of binaries, else compiled (and cached)."""
        import time
        cl = _cl()
        options = options_string(defines or {})
        key = (name, options, source)
        with self._lock:
            prg = self._programs.get(key)
            if prg is not None:
                return prg
            t0 = time.perf_counter()
            text = source if source is not None else kernel_source(name)
            digest = self.program_key(text, options)
            path = cache_dir() / f"{digest}.bin"
            prg = None
            if path.is_file():
                try:
                    prg = cl._cl._Program(self.context, [self.cl_device], [path.read_bytes()])
                    _build(prg, options, self.cl_device)
                    self.build_stats["from_disk"] += 1
                except cl.Error:
                    prg = None  # stale or foreign binary: rebuild from source
            if prg is None:
                self._announce_compile()
                prg = self._compile(name, text, options)
                self.build_stats["compiled"] += 1
                try:
                    binary = prg.get_info(cl.program_info.BINARIES)[0]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_bytes(binary)
                    os.replace(tmp, path)
                except (OSError, cl.Error):
                    pass  # a cache that cannot be written is only slower
            self.build_stats["seconds"] += time.perf_counter() - t0
            self._programs[key] = prg
            return prg

    def _announce_compile(self) -> None:
        """Say once per device and process that kernels are compiling (seconds to a minute on a
        cold cache, silent otherwise): a warning on the 'offload' logger, which Python prints
        to stderr when logging is not configured."""
        if self._announced:
            return
        self._announced = True
        _log.warning("%s: compiling OpenCL kernels on first use (can take a minute; binaries "
                    "are cached in %s, later runs load them in milliseconds). Build a model's "
                    "kernels ahead of time with `offload warmup MODEL --device %s`.",
                    self.spec, cache_dir(), self.spec)

    def _compile(self, name, text, options):
        cl = _cl()
        prg = cl._cl._Program(self.context, text)
        try:
            _build(prg, options, self.cl_device)
        except cl.Error as e:
            try:
                log = prg.get_build_info(self.cl_device, cl.program_build_info.LOG)
            except cl.Error:
                log = ""
            log = (log or str(e)).strip()
            where = failing_line(log, text)
            raise KernelBuildError(f"{self.spec}: building {name} failed (options {options!r})"
                                   + (f" at {where}" if where else ""), log, text) from None
        return prg

    def kernel(self, program: str, name: str, defines: dict | None = None, source=None):
        return _cl().Kernel(self.program(program, defines, source), name)

    def launch_1d(self, program, name, n, args, what, defines=None, source=None):
        """The runtime of the shared builders (drivers/_builders.py): one 1-D launch; Buffer
        arguments become their cl.Buffer, None a null pointer."""
        args = tuple(a.mem if isinstance(a, Buffer) else a for a in args)
        kernel = self.kernel(program, name, defines, source)
        kernel.set_args(*args)
        return _launch(self, kernel, (_round_up(n, LOCAL_1D),), (LOCAL_1D,), what, args)


# ------------------------------------------------------------------------------ launching

def _build(prg, options: str, cl_device):
    """Build a raw pyopencl program (raises cl.Error; the build log stays readable)."""
    prg._build(options=options.encode(), devices=[cl_device])


def _round_up(n, m):
    return (n + m - 1) // m * m


def _launch(device, kernel, global_size, local_size, what, args=()):
    """A callable that enqueues ``kernel`` (arguments already set); nothing for empty grids.
    ``args`` are kept alive with the callable: clSetKernelArg does not retain memory objects."""
    if any(g == 0 for g in global_size):
        return lambda: None
    cl = _cl()
    enqueue, queue = cl.enqueue_nd_range_kernel, device.queue
    gs, ls = tuple(int(g) for g in global_size), tuple(int(s) for s in local_size)
    keep = (kernel, args)
    device.note_uses(kernel, args)

    def run():
        assert keep
        try:
            enqueue(queue, kernel, gs, ls)
        except cl.Error as e:
            raise map_error(device, e, what) from None
    return run


def _launch_1d(ctx, program, name, n, args, what):
    return launch(ctx, program, name, n, args, what)


def _epilogue_args(attrs):
    return epilogue_args(attrs, "opencl")


def gemm(device, a, b, c, m, n, k, *, lda, ldb, ldc, batch=1, groups=1, sa=(0, 0), sb=(0, 0),
         sc=(0, 0), bias=None, bias_mode=0, bias_gs=0, residual=None, epilogue=None,
         naive=False, defines=None, storage=None):
    """A callable running C[z] = epilogue(A[z] @ B[z]) for z in range(batch * groups) (see
    gemm.cl for the operand layout); ``defines``: the tile shape (default: the device's),
    ``storage``: the tensor storage defines (precision.kernel_defines)."""
    cfg = dict(device.gemm_config if defines is None else defines)
    cfg.update(storage or {})
    name = "gemm_naive" if naive else "gemm_direct" if cfg.get("DIRECT") else "gemm_tiled"
    kernel = device.kernel("gemm.cl", name, cfg)
    act, alpha, lo, hi = epilogue if epilogue is not None else _epilogue_args({})
    args = (a.mem, b.mem, c.mem, bias.mem if bias is not None else None,
            residual.mem if residual is not None else None,
            i32(m), i32(n), i32(k), i32(lda), i32(ldb), i32(ldc), i32(groups),
            i32(sa[0]), i32(sa[1]), i32(sb[0]), i32(sb[1]), i32(sc[0]), i32(sc[1]),
            i32(bias_gs), i32(bias_mode), act, alpha, lo, hi)
    kernel.set_args(*args)
    z = batch * groups
    if naive:
        local = (16, 16, 1)
        glob = (_round_up(n, 16), _round_up(m, 16), z)
    else:
        lx, ly = cfg["TN"] // cfg["WN"], cfg["TM"] // cfg["WM"]
        local = (lx, ly, 1)
        glob = (-(-n // cfg["TN"]) * lx, -(-m // cfg["TM"]) * ly, z)
    if m == 0 or n == 0:
        return lambda: None
    if k == 0:
        raise UnsupportedOpError("opencl: matrix product with an empty inner axis",
                                 [("dense", "")])
    return _launch(device, kernel, glob, local, "gemm", args)


# -------------------------------------------------------------------------------- builders

def build_dense(ctx, attrs, ins, out):
    device = ctx.device
    x, w = ins[0], ins[1]
    k, n = w.shape
    m = x.size // k if k else 0
    wb = ctx.weight(w)
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    residual = _operand(ctx, ins[3]) if len(ins) > 3 else None
    return gemm(device, x, wb, out, m, n, k, lda=k, ldb=n, ldc=n, bias=bias,
                bias_mode=1 if bias is not None else 0, residual=residual,
                epilogue=_epilogue_args(attrs), storage=ctx.kernel_defines)


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

    if groups == c and cg == 1 and m == c:  # depthwise: direct
        wb = ctx.weight(w)
        total = n * m * p
        return _launch_1d(ctx, "conv.cl", "depthwise_conv", total, (
            x.mem, wb.mem, bias.mem if bias is not None else None,
            residual.mem if residual is not None else None, out.mem, i32(total),
            i32(c), i32(h), i32(wd), i32(kh), i32(kw), i32(oh), i32(ow), i32(sh), i32(sw),
            i32(pt), i32(pl), i32(dh), i32(dw), *epi), "depthwise conv")

    mg = m // groups
    ckk = cg * kh * kw
    wb = ctx.weight(w)  # [M, CG, KH, KW] is [G, MG, CKK] row-major
    common = dict(batch=n, groups=groups, sa=(0, mg * ckk), sc=(m * p, mg * p), bias=bias,
                  bias_mode=2 if bias is not None else 0, bias_gs=mg, residual=residual,
                  epilogue=epi, lda=ckk, ldb=p, ldc=p, storage=ctx.kernel_defines)
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any(attrs["pads"]):
        # 1x1: the input image is already the [C, H*W] matrix
        return gemm(device, wb, x, out, mg, p, ckk, sb=(c * p, cg * p), **common)
    cols = ctx.scratch((n, c * kh * kw, p))
    total = n * c * kh * kw * p
    fill = _launch_1d(ctx, "conv.cl", "im2col", total, (
        x.mem, cols.mem, i32(total), i32(c), i32(h), i32(wd), i32(kh), i32(kw), i32(oh),
        i32(ow), i32(sh), i32(sw), i32(pt), i32(pl), i32(dh), i32(dw)), "im2col")
    mult = gemm(device, wb, cols, out, mg, p, ckk, sb=(c * kh * kw * p, ckk * p), **common)
    return _sequence(fill, mult)




def build_matmul(ctx, attrs, ins, out):
    """C[z] = A[z] @ B[z] for two run-time (or constant) operands of any rank, the batch axes
    broadcast (batched gemm.cl launches over at most two batch levels each)."""
    a, b = (_operand(ctx, v) for v in ins)
    plan = matmul_plan(a.shape, b.shape, out.shape)
    (batch, groups), (sa, sb, sc) = plan.batch, plan.strides
    return gemm(ctx.device, a, b, out, plan.m, plan.n, plan.k, lda=plan.k, ldb=plan.n,
                ldc=plan.n, batch=batch, groups=groups, sa=sa, sb=sb, sc=sc,
                storage=ctx.kernel_defines)


OPS = dict(SHARED, conv2d=build_conv2d, dense=build_dense, matmul=build_matmul)
assert set(OPS) == G.DEVICE_OPS


# ------------------------------------------------------------------------------- discovery

_PROBE = "__kernel void probe(__global float* x) { x[get_global_id(0)] *= 2.0f; }"


def _probe(cl_device) -> str:
    """'' when the device compiles and runs a trivial kernel, else why not."""
    cl = _cl()
    try:
        ctx = cl.Context([cl_device])
        prg = cl._cl._Program(ctx, _PROBE)
        try:
            _build(prg, "", cl_device)
        except cl.Error as e:
            log = prg.get_build_info(cl_device, cl.program_build_info.LOG) or str(e)
            return f"its compiler fails on a trivial kernel: {log.strip().splitlines()[0]}"
        return ""
    except cl.Error as e:
        return f"cannot create a context: {e}"


def _short_version(platform_version: str) -> str:
    """'OpenCL 3.0 PoCL 6.0+debian  Linux, None+Asserts, ...' -> 'OpenCL 3.0 PoCL 6.0+debian'."""
    return " ".join(platform_version.split(",")[0].split()[:4])


def _version_key(text: str) -> tuple:
    """Numbers in a version string, for ordering newest first: 'PoCL 6.0+debian' -> (3, 0, 6, 0)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:6])


# Device types best first: a GPU or accelerator before a CPU (which the cpu device already uses).
_TYPE_RANK = ("GPU", "ACCELERATOR", "CPU")


def _type_rank(cl, d) -> int:
    for rank, name in enumerate(_TYPE_RANK):
        if d.type & getattr(cl.device_type, name):
            return rank
    return len(_TYPE_RANK)


def discover():
    """OpenCL devices of every platform, numbered best first, in an order that does not depend
    on the ICD loader's: devices that compile and run a probe kernel first, then GPUs before
    accelerators before CPUs, then the newest platform version, then platform and device name.
    Each is named '<platform> (<version>) / <device>', and ``opencl:<text>`` picks the first
    available device whose name, platform, vendor or version contains <text> ('opencl:pocl')."""
    try:
        import pyopencl as cl
    except ImportError:
        return [DeviceInfo("opencl:0", False,
                           reason="pyopencl is not installed (pip install offload[opencl])")]
    try:
        platforms = cl.get_platforms()
    except Exception as e:  # noqa: BLE001 - no ICD loader / platform: report, never raise
        return [DeviceInfo("opencl:0", False, reason=f"no OpenCL platform (ICD): {e}")]
    found = []
    for platform in platforms:
        try:
            found.extend((platform, d) for d in platform.get_devices())
        except Exception:  # noqa: BLE001 - a platform without devices
            continue
    if not found:
        return [DeviceInfo("opencl:0", False, reason="no OpenCL device on any platform")]
    entries = []
    for platform, d in found:
        version = _short_version(platform.version.strip())
        name = f"{platform.name.strip()} ({version}) / {d.name.strip()}"
        try:
            why = _probe(d)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        key = (bool(why), _type_rank(cl, d), tuple(-v for v in _version_key(version)),
               platform.name.strip(), d.name.strip())
        match = " ".join([platform.name, platform.vendor, platform.version])
        entries.append((key, platform, d, name, why, match))
    entries.sort(key=lambda e: e[0])
    infos = []
    for index, (_, platform, d, name, why, match) in enumerate(entries):
        spec = f"opencl:{index}"
        if why:
            infos.append(DeviceInfo(spec, False, name, reason=f"{platform.version.strip()}: {why}",
                                    match=match))
        else:
            infos.append(DeviceInfo(spec, True, name, match=match,
                                    open=lambda i=index, dev=d: OpenCLDevice(i, dev)))
    return infos
