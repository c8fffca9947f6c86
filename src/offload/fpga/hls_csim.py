"""C-simulation of the HLS kernels: ``kernels/hls/*.cpp`` compiled by the host C++ compiler.

The very sources that ``v++`` compiles for the card (``dense.cpp``, ``conv2d.cpp``, ``pool.cpp``)
are compiled with g++ against the Apache-2.0 ``ap_fixed.h`` headers into one shared library per
set of types, and called through :mod:`ctypes` over flat arrays. ``ap_fixed`` arithmetic in the
library is Xilinx's own header code, so this is the reference that :mod:`offload.fpga.quant` is checked
against bit for bit.

Memory layout (the same on the card, see ``kernels/hls/offload_hls.h``): every port is an array of
plain integers holding raw values ``value * 2**F``, sign-extended (``ap_fixed``) or zero-extended
(``ap_ufixed``) in the smallest of 8/16/32/64 bits holding ``W``
(:attr:`offload.fpga.quant.FixedType.storage_dtype`): ``ap_fixed<16,6>`` travels as ``int16``,
``ap_fixed<18,8>`` as ``int32``. The methods here take and return raw ``int64`` arrays (the
:mod:`offload.fpga.quant` representation) and convert at the boundary.

Libraries are cached in ``$OFFLOAD_CACHE/hls`` (default ``~/.cache/offload/hls``), one file per
hash of (sources, headers, compiler version, flags, types); the first use of a set of types
compiles (~3 s), later uses load the file. A failed compile raises
:class:`offload.errors.KernelBuildError` with the compiler's log. The compiler is ``$CXX`` or
``g++``; ``$OFFLOAD_AP_TYPES`` points at another ``ap_types`` folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from .._resources import HLS_DIR as _HLS_DIR
from . import quant
from ..errors import KernelBuildError, ShapeError

__all__ = ["KernelTypes", "CsimKernels", "build", "load", "hls_dir", "ap_types_dir",
           "cache_dir", "compiler", "build_library"]

KERNEL_SOURCES = ("dense.cpp", "conv2d.cpp", "pool.cpp", "csim_api.cpp")
HEADERS = ("offload_hls.h",)
CXXFLAGS = ("-O2", "-std=c++14", "-shared", "-fPIC", "-Wno-unknown-pragmas")
_Q_ENUM = {"AP_RND": 0, "AP_RND_ZERO": 1, "AP_RND_MIN_INF": 2, "AP_RND_INF": 3,
           "AP_RND_CONV": 4, "AP_TRN": 5, "AP_TRN_ZERO": 6}  # ap_decl.h order
_O_ENUM = {"AP_SAT": 0, "AP_SAT_ZERO": 1, "AP_SAT_SYM": 2, "AP_WRAP": 3}


def hls_dir() -> pathlib.Path:
    """The folder of the HLS kernel sources."""
    return _HLS_DIR


def ap_types_dir() -> pathlib.Path:
    """``$OFFLOAD_AP_TYPES`` or the vendored Apache-2.0 headers in ``kernels/hls/ap_types``."""
    env = os.environ.get("OFFLOAD_AP_TYPES")
    return pathlib.Path(env).expanduser() if env else _HLS_DIR / "ap_types"


def cache_dir() -> pathlib.Path:
    env = os.environ.get("OFFLOAD_CACHE")
    base = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "offload"
    return base / "hls"


def compiler() -> str | None:
    """Path of the C++ compiler (``$CXX`` or ``g++``), or None."""
    return shutil.which(os.environ.get("CXX") or "g++")


@dataclasses.dataclass(frozen=True)
class KernelTypes:
    """The five compile-time types of a kernel library (strings or :class:`quant.FixedType`).

    ``weight``, ``bias`` and ``out`` default to ``data``. For the pooling kernels ``data`` is
    the input, ``out`` the output and ``acc`` the average-pool accumulator.
    """

    data: quant.FixedType | str = "ap_fixed<16,6>"
    weight: quant.FixedType | str | None = None
    bias: quant.FixedType | str | None = None
    acc: quant.FixedType | str = "ap_fixed<32,12>"
    out: quant.FixedType | str | None = None

    def __post_init__(self):
        data = quant.parse(self.data)
        object.__setattr__(self, "data", data)
        for f in ("weight", "bias", "out"):
            v = getattr(self, f)
            object.__setattr__(self, f, data if v is None else quant.parse(v))
        object.__setattr__(self, "acc", quant.parse(self.acc))
        for f in ("data", "weight", "bias", "out"):
            if getattr(self, f).width > 32:
                raise ValueError(f"{f} type {getattr(self, f)}: kernel ports hold at most "
                                 f"32-bit values")

    def macros(self) -> dict[str, str]:
        return {"DATA_T": self.data.cpp, "WEIGHT_T": self.weight.cpp, "BIAS_T": self.bias.cpp,
                "ACC_T": self.acc.cpp, "OUT_T": self.out.cpp}

    def __str__(self) -> str:
        return (f"data={self.data} weight={self.weight} bias={self.bias} acc={self.acc} "
                f"out={self.out}")

    def as_tuple(self) -> tuple:
        return (self.data, self.weight, self.bias, self.acc, self.out)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class CsimKernels:
    """One compiled kernel library; methods take and return raw int64 arrays."""

    def __init__(self, path: pathlib.Path, types: KernelTypes):
        self.path = pathlib.Path(path)
        self.types = types
        self.lib = ctypes.CDLL(str(self.path))
        vp, ci = ctypes.c_void_p, ctypes.c_int
        self.lib.dense.argtypes = [vp] * 4 + [ci] * 4
        self.lib.conv2d.argtypes = [vp] * 4 + [ci] * 9
        self.lib.maxpool2d.argtypes = [vp] * 2 + [ci] * 5
        self.lib.avgpool2d.argtypes = [vp] * 2 + [ci] * 5
        for f in ("dense", "conv2d", "maxpool2d", "avgpool2d"):
            getattr(self.lib, f).restype = None
        info = (ctypes.c_longlong * 37)()
        self.lib.offload_hls_info(info)
        info = list(info)
        for i, (name, t) in enumerate(zip(("data", "weight", "bias", "acc", "out"),
                                          types.as_tuple())):
            want = [t.width, t.integer, int(t.signed), _Q_ENUM[t.q], _O_ENUM[t.o],
                    t.storage_dtype.itemsize if name != "acc" else info[6 * i + 5]]
            if info[6 * i:6 * i + 6] != want:
                raise KernelBuildError(
                    f"{self.path}: compiled {name} type {info[6 * i:6 * i + 6]} differs from "
                    f"the expected {t} {want}")
        keys = ("dense_max_in", "dense_max_out", "dense_max_w", "conv_max_in", "conv_max_cout",
                "conv_max_w", "pool_max_shift")
        self.limits = dict(zip(keys, info[30:37]))

    def __repr__(self) -> str:
        return f"CsimKernels({self.path.name}, {self.types})"

    def symbol(self, name: str):
        """A raw ctypes function of the library (for extra sources)."""
        return getattr(self.lib, name)

    # -- helpers ---------------------------------------------------------------------------
    def _limit(self, ok: bool, what: str):
        if not ok:
            raise ShapeError(f"{what} exceeds the kernel's on-chip buffers {self.limits}")

    def _bias(self, b_raw, n: int) -> np.ndarray:
        if b_raw is None:
            return np.zeros(n, self.types.bias.storage_dtype)
        b = np.asarray(b_raw)
        if b.shape != (n,):
            raise ShapeError(f"bias: expected shape ({n},), got {b.shape}")
        return self.types.bias.to_storage(b)

    # -- kernels ---------------------------------------------------------------------------
    def dense(self, x_raw, w_raw, b_raw=None, relu: bool = False) -> np.ndarray:
        """``x [N, K]``, ``w [M, K]``, ``b [M]`` raw -> ``[N, M]`` raw (out type)."""
        t = self.types
        x, w = t.data.to_storage(x_raw), t.weight.to_storage(w_raw)
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] < 1:
            raise ShapeError(f"dense: expected x [N, K] and w [M, K], got {x.shape}, {w.shape}")
        n, k = x.shape
        m = w.shape[0]
        lim = self.limits
        self._limit(k <= lim["dense_max_in"] and m <= lim["dense_max_out"]
                    and k * m <= lim["dense_max_w"], f"dense {k}->{m}")
        b = self._bias(b_raw, m)
        y = np.zeros((n, m), t.out.storage_dtype)
        self.lib.dense(_ptr(x), _ptr(w), _ptr(b), _ptr(y), n, k, m, int(bool(relu)))
        return y.astype(np.int64)

    def conv2d(self, x_raw, w_raw, b_raw=None, pad: int = 0, relu: bool = False) -> np.ndarray:
        """``x [N, C, H, W]``, ``w [O, C, KH, KW]``, ``b [O]`` raw -> ``[N, O, HO, WO]`` raw."""
        t = self.types
        x, w = t.data.to_storage(x_raw), t.weight.to_storage(w_raw)
        if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1] or x.shape[0] < 1:
            raise ShapeError(f"conv2d: expected x [N, C, H, W] and w [O, C, KH, KW], "
                             f"got {x.shape}, {w.shape}")
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
        if pad < 0 or ho < 1 or wo < 1:
            raise ShapeError(f"conv2d: kernel {kh}x{kw} does not fit {h}x{wd} with pad {pad}")
        lim = self.limits
        self._limit(c * h * wd <= lim["conv_max_in"] and o <= lim["conv_max_cout"]
                    and w.size <= lim["conv_max_w"], f"conv2d {x.shape[1:]} x {w.shape}")
        b = self._bias(b_raw, o)
        y = np.zeros((n, o, ho, wo), t.out.storage_dtype)
        self.lib.conv2d(_ptr(x), _ptr(w), _ptr(b), _ptr(y), n, c, h, wd, o, kh, kw, int(pad),
                        int(bool(relu)))
        return y.astype(np.int64)

    def _pool(self, fn, x_raw, k: int) -> np.ndarray:
        x = self.types.data.to_storage(x_raw)
        if x.ndim != 4 or x.shape[0] < 1 or k < 1 or x.shape[2] < k or x.shape[3] < k:
            raise ShapeError(f"pool: expected x [N, C, H, W] with H, W >= {k}, got {x.shape}")
        n, c, h, wd = x.shape
        y = np.zeros((n, c, h // k, wd // k), self.types.out.storage_dtype)
        fn(_ptr(x), _ptr(y), n, c, h, wd, int(k))
        return y.astype(np.int64)

    def maxpool2d(self, x_raw, k: int = 2) -> np.ndarray:
        return self._pool(self.lib.maxpool2d, x_raw, k)

    def avgpool2d(self, x_raw, k: int = 2) -> np.ndarray:
        area = k * k
        if area & (area - 1) or area.bit_length() - 1 > self.limits["pool_max_shift"]:
            raise ShapeError(f"avgpool2d: window area {area} must be a power of two <= "
                             f"2**{self.limits['pool_max_shift']}")
        return self._pool(self.lib.avgpool2d, x_raw, k)


@functools.lru_cache(maxsize=1)
def _headers_digest(ap_dir: str) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(ap_dir).rglob("*.h")):
        h.update(p.relative_to(ap_dir).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _compiler_version(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return r.stdout.splitlines()[0] if r.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


_build_lock = threading.Lock()


def build_library(sources, defines: dict | None = None, *,
                  cache: str | os.PathLike | None = None, force: bool = False,
                  what: str = "HLS C-simulation") -> pathlib.Path:
    """Compile C++ ``sources`` (with ``-D`` ``defines``, the ap_types and kernels/hls folders on
    the include path) into a shared library in the cache; return its path. Cached by a hash of
    the sources, ``offload_hls.h``, the ap_types headers, the compiler version and the flags."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError(
            f"no C++ compiler for {what}: {os.environ.get('CXX') or 'g++'} not found "
            f"(install g++ or set $CXX)")
    ap_dir = ap_types_dir()
    if not (ap_dir / "ap_fixed.h").is_file():
        raise KernelBuildError(f"ap_fixed.h not found in {ap_dir} (set $OFFLOAD_AP_TYPES)")
    sources = [pathlib.Path(s) for s in sources]
    flags = list(CXXFLAGS) + [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    h = hashlib.sha256()
    for part in (_compiler_version(cxx), cxx, " ".join(flags), _headers_digest(str(ap_dir))):
        h.update(part.encode() + b"\0")
    for p in sources + [_HLS_DIR / s for s in HEADERS]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    key = h.hexdigest()[:20]
    folder = pathlib.Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / f"offload_hls-{key}.so"
    if target.is_file() and not force:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".offload_hls-{key}.", suffix=".so.tmp", dir=folder)
    os.close(fd)
    cmd = [cxx, *flags, "-I", str(ap_dir), "-I", str(_HLS_DIR), *map(str, sources), "-o", tmp]
    try:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"could not run {cxx}: {e}", log=" ".join(cmd)) from None
        if r.returncode != 0:
            raise KernelBuildError(
                f"{what} build failed ({cxx} exit {r.returncode})",
                log=" ".join(cmd) + "\n" + r.stdout + r.stderr,
                source=", ".join(map(str, sources)))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: concurrent builders never load a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build(types: KernelTypes | None = None, *, extra_sources=(), defines: dict | None = None,
          cache: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Compile (or find in the cache) the kernel library for ``types``; return its path.

    ``extra_sources`` are more C++ files compiled into the same library (test probes);
    ``defines`` more ``-D`` macros (e.g. the on-chip buffer limits).
    """
    types = types or KernelTypes()
    macros = dict(types.macros())
    macros.update({k: str(v) for k, v in (defines or {}).items()})
    sources = [_HLS_DIR / s for s in KERNEL_SOURCES] + [pathlib.Path(s) for s in extra_sources]
    return build_library(sources, macros, cache=cache, force=force,
                         what=f"HLS C-simulation of {types.data}/{types.acc}/{types.out}")


_loaded: dict = {}


def load(types: KernelTypes | None = None, **kw) -> CsimKernels:
    """:func:`build` then load; one library object per (types, options) per process."""
    types = types or KernelTypes()
    key = (types, tuple(map(str, kw.get("extra_sources", ()))),
           tuple(sorted((kw.get("defines") or {}).items())), str(kw.get("cache")))
    with _build_lock:
        lib = _loaded.get(key)
        if lib is None:
            lib = _loaded[key] = CsimKernels(build(types, **kw), types)
        return lib
