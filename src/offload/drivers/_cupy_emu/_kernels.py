"""cuda-emu:0's kernels: ``RawModule`` compiles each source with the real NVRTC (CuPy 14.2's
options) and with g++ for the host (``host.h`` + dialect.h's CUDA side); ``RawKernel`` checks the
arguments against the kernel's parameters and queues the host run on the stream."""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np

from . import (ARCH, MAX_THREADS, CompileException, EmulationError, MemoryPointer, NVRTCError,
               _gpu, get_current_stream, ndarray)

_HERE = pathlib.Path(__file__).resolve().parent
CXXFLAGS = ("-O2", "-std=gnu++17", "-ffp-contract=fast", "-march=native", "-shared", "-fPIC",
            "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable")

# ---------------------------------------------------------------------------------- NVRTC

_nvrtc_lock = threading.Lock()
_nvrtc = None


def nvrtc_candidates() -> list[str]:
    """libnvrtc in the CUDA 13 wheel layout (nvidia/cu13/lib), the CUDA 12 one
    (nvidia/cuda_nvrtc/lib), then toolkits; newest first."""
    found = []
    for root in sys.path:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.13*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.1*"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    found += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.1*"), reverse=True)
    return [f for f in found if ".alt." not in f]


def load_nvrtc():
    """The NVRTC library (ctypes), or NVRTCError naming what was tried."""
    global _nvrtc
    with _nvrtc_lock:
        if _nvrtc is None:
            errors = []
            for path in nvrtc_candidates():
                try:
                    lib = ctypes.CDLL(path)
                except OSError as e:
                    errors.append(f"{path}: {e}")
                    continue
                lib.nvrtcGetErrorString.restype = ctypes.c_char_p
                lib.path = path
                _nvrtc = lib
                break
            else:
                raise NVRTCError(-1, "libnvrtc not found (pip install 'nvidia-cuda-nvrtc>=13')"
                                 + (f"; tried {errors}" if errors else ""))
        return _nvrtc


def nvrtc_version() -> tuple[int, int]:
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def cupy_include_dir() -> str:
    """Where CuPy 14.2 keeps its headers (``cupy/_core/include``); the emulation's stand-in."""
    return str(_HERE / "include")


def cuda_include_dir() -> str | None:
    """CUDA's headers as CuPy looks for them (cuda.pathfinder 'cudart'): a wheel or a toolkit."""
    for root in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            if os.path.isfile(os.path.join(root, sub, "cuda_runtime.h")):
                return os.path.join(root, sub)
    for path in [os.environ.get("CUDA_PATH", "")] + sorted(glob.glob("/usr/local/cuda*"),
                                                           reverse=True):
        if path and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")):
            return os.path.join(path, "include")
    return None


def cupy_nvrtc_options(options: tuple, arch: str = ARCH) -> tuple:
    """The options CuPy 14.2 hands NVRTC for ``RawModule(code=..., options=options)``:
    ``_core.core.assemble_cupy_compiler_options`` (the CCCL include dirs first, ``--std=c++17``
    unless a standard is given, ``-I`` CuPy's headers and CUDA's), then
    ``cuda.compiler._compile_with_cache_cuda`` (``-ftz=true``) and
    ``_compile_using_nvrtc_no_warning`` (``-arch=sm_XX`` for cubin,
    ``--device-as-default-execution-space``). (CuPy raises RuntimeError when it finds no CUDA
    headers; the emulation then leaves that ``-I`` out.)"""
    options = tuple(options)
    if not any("-std=" in o for o in options):
        options += ("--std=c++17",)
    inc = cupy_include_dir()
    options = (f"-I{inc}/cupy/_cccl/cub", f"-I{inc}/cupy/_cccl/thrust",
               f"-I{inc}/cupy/_cccl/libcudacxx") + options + (f"-I{inc}",)
    cuda_inc = cuda_include_dir()
    if cuda_inc:
        options += (f"-I{cuda_inc}",)
    options += ("-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")
    return options


def nvrtc_compile(source: str, name: str, options: tuple) -> bytes:
    """NVRTC's cubin for ``source``; CompileException with NVRTC's log on failure (CuPy turns
    every NVRTCError of nvrtcCompileProgram into one)."""
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                None)
    if rc:
        raise NVRTCError(rc, lib.nvrtcGetErrorString(rc).decode())
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc:
            raise CompileException(log.value.decode(errors="replace"), source, name, options)
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------ kernel signatures

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)|'
                     r'\bKERNEL\s+void\s+(\w+)\s*\(([^)]*)\)')
_SCALARS = {"int": ("int", 4), "unsigned": ("int", 4), "unsigned int": ("int", 4),
            "float": ("float", 4), "bool": ("bool", 1), "long long": ("int", 8),
            "double": ("float", 8)}


def parse_kernels(source: str) -> dict:
    """{name: [(kind, size, type text), ...]} of every kernel in ``source``, with ``body_has_
    barrier``: kind is "pointer", "int", "float" or "bool" (size in bytes)."""
    out = {}
    for m in _KERNEL.finditer(source):
        name = m.group(1) or m.group(3)
        params = m.group(2) if m.group(1) else m.group(4)
        kinds = []
        for p in (p.strip() for p in params.split(",")):
            if not p:
                continue
            words = p.split()
            text = " ".join(words[:-1]) if len(words) > 1 else p
            if "*" in p:
                kinds.append(("pointer", 8, text))
            else:
                base = " ".join(w for w in words[:-1] if w not in ("const",))
                if base not in _SCALARS:
                    raise EmulationError(f"kernel {name}: parameter {p!r}: type not emulated")
                kinds.append((*_SCALARS[base], text))
        body_start = source.index("{", m.end())
        depth, i = 0, body_start
        while True:
            c = source[i]
            depth += c == "{"
            depth -= c == "}"
            i += 1
            if depth == 0:
                break
        body = source[body_start:i]
        out[name] = (kinds, "BARRIER()" in body or "__syncthreads" in body)
    return out


def _wrapper(name, kinds, fibered) -> str:
    lines = [f'extern "C" int emu_run_{name}(const unsigned* g, const unsigned* b, void** a)',
             "{"]
    args = []
    for i, (_, _, text) in enumerate(kinds):
        lines.append(f"    typedef {text} P{i};")
        args.append(f"*(P{i}*)a[{i}]")
    lines.append(f"    return emu::run_grid(g, b, {int(fibered)}, [&]() {{ {name}({', '.join(args)}); }});")
    lines.append("}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ host build

_build_lock = threading.Lock()


def _cache_dir() -> pathlib.Path:
    env = os.environ.get("OFFLOAD_CACHE")
    base = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "offload"
    return base / "cuda-emu"


def _cpu() -> str:
    """The host CPU's model (the libraries are built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def host_build(source: str, options: tuple, kernels: dict) -> pathlib.Path:
    """g++ build of ``source`` for the host (the -D options of the NVRTC compile kept), cached
    by a hash of everything that goes in."""
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if cxx is None:
        raise EmulationError("cuda-emu needs a C++ compiler (g++ or $CXX)")
    defines = [o for o in options if o.startswith("-D")]
    text = "\n".join([f'#include "{_HERE / "host.h"}"', source] +
                     [_wrapper(n, k, f) for n, (k, f) in kernels.items()]) + "\n"
    h = hashlib.sha256()
    for part in (cxx, _cpu(), " ".join(CXXFLAGS), " ".join(defines),
                 (_HERE / "host.h").read_text(), text):
        h.update(part.encode() + b"\0")
    folder = _cache_dir()
    target = folder / f"kernels-{h.hexdigest()[:20]}.so"
    if target.is_file():
        return target
    with _build_lock:
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = pathlib.Path(tmp) / "kernels.cpp"
            src.write_text(text)
            out = pathlib.Path(tmp) / "kernels.so"
            cmd = [cxx, *CXXFLAGS, *defines, str(src), "-o", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode:
                raise EmulationError(f"cuda-emu: the host build of a source that NVRTC "
                                     f"compiled failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
            os.replace(out, target)
    return target


# ---------------------------------------------------------------------------------- modules

class RawModule:
    """As ``cupy.RawModule(code=..., options=..., backend='nvrtc')``: compiled lazily (on
    ``compile()`` or the first ``get_function``)."""

    def __init__(self, *, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None:
            raise EmulationError("RawModule(path=...) is not emulated")
        if backend != "nvrtc":
            raise EmulationError(f"RawModule backend {backend!r} is not emulated")
        self.code, self.options, self.backend = code, tuple(options), backend
        self._lib = None
        self._kernels = None
        self.cubin_size = 0

    def compile(self, log_stream=None):
        if self._lib is not None:
            return
        options = cupy_nvrtc_options(self.options)
        cubin = nvrtc_compile(self.code, "kern.cu", options)
        self.cubin_size = len(cubin)
        self._kernels = parse_kernels(self.code)
        self._lib = ctypes.CDLL(str(host_build(self.code, options, self._kernels)))
        _gpu.counters["modules"] += 1

    def get_function(self, name):
        self.compile()
        if name not in self._kernels:
            from . import CUDADriverError
            raise CUDADriverError(500, "CUDA_ERROR_NOT_FOUND: named symbol not found")
        kinds, fibered = self._kernels[name]
        fn = getattr(self._lib, f"emu_run_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return RawKernel(name, kinds, fn, self)


_C_TYPES = {("int", 4): ctypes.c_int32, ("int", 8): ctypes.c_int64,
            ("float", 4): ctypes.c_float, ("float", 8): ctypes.c_double,
            ("bool", 1): ctypes.c_bool, ("pointer", 8): ctypes.c_uint64}


def _as_c(name, i, kind, size, arg):
    """One argument as CuPy 14.2 would pass it (function.pyx ``_pointer``), checked against the
    kernel's parameter ``i``: the C value to pass, or EmulationError."""
    what = f"kernel {name} argument #{i}"
    if arg is None:
        got, value, gsize = "pointer", 0, 8
    elif isinstance(arg, ndarray):
        got, value, gsize = "pointer", arg.data.ptr, 8
    elif isinstance(arg, MemoryPointer):
        got, value, gsize = "pointer", arg.ptr, 8
    elif isinstance(arg, np.ndarray):
        if arg.size != 1:
            raise TypeError(f"You are trying to pass a numpy.ndarray of shape {arg.shape} as a "
                            "kernel parameter. Only numpy.ndarrays of size one can be passed "
                            "by value.")
        arg = arg.reshape(())[()]
        return _as_c(name, i, kind, size, arg)
    elif isinstance(arg, bool):
        got, value, gsize = "bool", arg, 1
    elif isinstance(arg, int):  # CuPy: a Python int is int64 (uint64 from 2**63)
        got, value, gsize = "int", arg, 8
    elif isinstance(arg, float):
        got, value, gsize = "float", arg, 8
    elif isinstance(arg, np.generic):
        dt = arg.dtype
        gsize = dt.itemsize
        got = {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(dt.kind, dt.kind)
        value = arg.item()
    else:
        raise TypeError(f"Unsupported type {type(arg)}")
    if kind == "pointer":
        if got == "pointer" or (got == "int" and gsize == 8):
            if value and _gpu.find(value) is None:
                raise EmulationError(f"{what}: pointer {value:#x} is not in device memory "
                                     "(a host address, or freed memory)")
            return ctypes.c_uint64(value)
        raise EmulationError(f"{what}: the kernel takes a pointer, got {got} of {gsize} bytes "
                             f"({type(arg).__name__})")
    if got == "pointer":
        raise EmulationError(f"{what}: the kernel takes {kind} ({size} bytes), got an array")
    if gsize != size or (got != kind and not (kind == "int" and got == "bool")):
        raise EmulationError(f"{what}: the kernel takes {kind} of {size} bytes, got {got} of "
                             f"{gsize} bytes ({type(arg).__name__} {arg!r}); CuPy would pass "
                             f"those bytes as they are")
    return _C_TYPES[(kind, size)](value)


class RawKernel:
    """As ``cupy.RawKernel`` from ``RawModule.get_function``: ``kernel(grid, block, args,
    shared_mem=0, stream=None)`` queues the host run of the grid on the stream."""

    def __init__(self, name, kinds, fn, module):
        self.name, self.kinds, self._fn, self._module = name, kinds, fn, module

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        name = self.name
        grid = tuple(grid) + (1,) * (3 - len(grid)) if isinstance(grid, tuple) else (grid, 1, 1)
        block = tuple(block) + (1,) * (3 - len(block)) if isinstance(block, tuple) \
            else (block, 1, 1)
        if not isinstance(args, tuple):
            raise TypeError(f"kernel {name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.kinds):
            raise EmulationError(f"kernel {name}: takes {len(self.kinds)} arguments "
                                 f"({', '.join(t for _, _, t in self.kinds)}), got {len(args)}")
        threads = block[0] * block[1] * block[2]
        if min(grid + block) < 1 or threads > MAX_THREADS or grid[1] > 65535 or \
                grid[2] > 65535 or grid[0] > 2 ** 31 - 1 or block[2] > 64:
            from . import CUDADriverError
            raise CUDADriverError(1, f"CUDA_ERROR_INVALID_VALUE: launch grid {grid} block "
                                  f"{block}")
        if shared_mem:
            raise EmulationError(f"kernel {name}: dynamic shared memory is not emulated")
        values = [_as_c(name, i, k, s, a) for i, ((k, s, _), a) in enumerate(zip(self.kinds,
                                                                                   args))]
        pointers = (ctypes.c_void_p * max(len(values), 1))(
            *[ctypes.addressof(v) for v in values])
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        fn, module = self._fn, self._module
        stream = stream or get_current_stream()

        def run():
            assert module and values  # the library and the C values live while queued
            rc = fn(g, b, pointers)
            if rc == 1:
                raise EmulationError(f"kernel {name}: __syncthreads() in a kernel not run as "
                                     "fibers")
            if rc == 2:
                raise EmulationError(f"kernel {name}: threads of a block left while others "
                                     "waited at __syncthreads() (undefined on a GPU)")
        _gpu.counters["launches"] += 1
        stream._enqueue(run, f"kernel {name}")
