"""The CPU device in NumPy: the embedded default and the reference every other device is checked
against.

Activations are NCHW float32 in 4 KiB-aligned host blocks. Groups-1 convolutions, large dense
layers and unpadded pools run in _core (csrc/conv_kernels.cpp) on the device's own thread pool
(set_num_threads): thin stride-1 convolutions with a direct kernel, the others as one SGEMM of
NumPy's OpenBLAS per image (1x1 on the input itself, else on im2col columns), bias, residual and
activation fused. Without a callable OpenBLAS, and for grouped/depthwise convolutions, the NumPy
paths below run: GEMMs on im2col patches with the epilogue applied in place.
Everything is float32 end to end: no float64 temporaries.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import elementwise as EW
from .. import graph as G
from ..device import ALL_DTYPES, Capabilities, Device, DeviceInfo
from .. import _core
from ..fpga import fixed_point
from ..hostmem import aligned_empty
from ._builders import rnn_weights
from ._kernels import _sequence

F32 = np.float32


ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "clip": 5}
SMALL_DENSE_MACS = 1 << 15  # below this a product is call overhead: one fused native call


def _activation_args(attrs):
    fn = attrs.get("activation", attrs.get("fn", "identity"))
    if fn not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {fn!r}")
    return (ACTIVATION_CODES[fn], float(attrs.get("alpha", 0.01)),
            float(attrs.get("lo", -np.inf)), float(attrs.get("hi", np.inf)))


class NativeStep:
    """A step that is one native call; consecutive ones are merged into one _core.Program."""

    def __init__(self, kind: str, *args):
        self.kind, self.args = kind, args
        self._run = functools.partial(getattr(_core, kind), *args)

    def __call__(self):
        self._run()

    def add_to(self, program):
        getattr(program, "add_" + self.kind)(*self.args)


def merge_native_steps(runs):
    """Consecutive NativeSteps become one call of a _core.Program (kept alive by the closure)."""
    merged, group = [], []

    def flush():
        if len(group) > 1:
            program = _core.Program()
            for step in group:
                step.add_to(program)
            merged.append(_keep_alive(program.run, tuple(group)))
        else:
            merged.extend(group)
        group.clear()

    for run in runs:
        if isinstance(run, NativeStep):
            group.append(run)
        else:
            flush()
            merged.append(run)
    flush()
    return merged


def _keep_alive(fn, refs):
    def run():
        fn()
    run.refs = refs  # the arrays the program points into live as long as this callable
    return run


def epilogue(y2: np.ndarray, attrs: dict, bias=None, bias_axis=1, residual=None):
    """A callable applying, in one native pass over y2 ([rows, cols], in place), the bias (one
    value per column, or per row cycling when bias_axis=0), a residual and the activation."""
    act = _activation_args(attrs)
    if bias is None and residual is None and act[0] == 0:
        return None
    if residual is not None:
        residual = residual.reshape(y2.shape)
    return functools.partial(_core.epilogue, y2, bias, bias_axis, residual, *act)


def build_dense(ctx, attrs, ins, out):
    if "chain" in attrs:
        return _build_dense_chain(ctx, attrs, ins, out)
    x, w = ins[0], ins[1]
    k, n = w.shape
    x2 = x.reshape(-1, k)
    y2 = out.reshape(-1, n)
    w = ctx.weight(w)
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    residual = ins[3].reshape(-1, n) if len(ins) > 3 else None
    if x2.shape[0] * k * n <= SMALL_DENSE_MACS:
        return NativeStep("dense", x2, w, bias, residual, y2, *_activation_args(attrs))
    if _c_float32(x2, y2, w):  # the packed-panel product (gemm.h), bias/activation fused
        wp = ctx.weight(ins[1], "panels", pack_columns)
        return functools.partial(_core.dense_packed, x2, wp, bias, residual, y2,
                                 *_activation_args(attrs))
    if native_blas() and x2.shape[0] * k * n >= _core.get_parallel_macs():
        return functools.partial(_core.gemm_dense, x2, w, bias, residual, y2,
                                 *_activation_args(attrs))
    return _sequence(functools.partial(np.matmul, x2, w, out=y2),
                     epilogue(y2, attrs, bias, 1, residual))


CHAIN_MAX_WIDTH = 1024  # columns of one layer of a fused chain
CHAIN_MAX_WEIGHTS = 1 << 18  # packed weights of a whole chain, in floats (1 MiB: they stay in L2)


def _chain_fits(rows, dims):
    """Whether dense layers of these (k, n), each read only by the next, run as one fused
    chain (fusions._fuse_dense_chain): each block of rows goes through every layer with its
    intermediates in cache, and every block reads every layer's weights again, so they must
    stay in L2 together; products too small for dense_packed stay with the merged small-op
    program, whose one call costs less."""
    if max(n for _, n in dims) > CHAIN_MAX_WIDTH or \
            sum(k * _pad16(n) for k, n in dims) > CHAIN_MAX_WEIGHTS:
        return False
    return any(rows * k * n > SMALL_DENSE_MACS for k, n in dims)


def _build_dense_chain(ctx, attrs, ins, out):
    """Dense layers fused by fusions._fuse_dense_chain: ins are [x, w1, (b1), w2, (b2), ...];
    float32 runs as one _core.DenseChain over weights packed as dense_packed takes them, any
    other storage layer by layer through scratch buffers."""
    layers, pos = [], 1
    for a, count in zip(attrs["chain"], attrs["counts"]):
        layers.append((a, ins[pos], ins[pos + 1] if count > 1 else None))
        pos += count
    x = ins[0]
    k0, n_last = layers[0][1].shape[0], layers[-1][1].shape[1]
    x2, y2 = x.reshape(-1, k0), out.reshape(-1, n_last)
    if _c_float32(x2, y2) and all(w.dtype == F32 for _, w, _ in layers):
        acts = [_activation_args(a) for a, _, _ in layers]
        chain = _core.DenseChain(
            x2, [ctx.weight(w, "panels", pack_columns) for _, w, _ in layers],
            [ctx.weight(b) if b is not None else None for _, _, b in layers], y2,
            [a[0] for a in acts], [a[1] for a in acts], [a[2] for a in acts],
            [a[3] for a in acts])
        return chain.run
    runs, src = [], x
    for i, (a, w, b) in enumerate(layers):  # (intermediates in scratch slots 0 and 1)
        dst = out if i == len(layers) - 1 else \
            ctx.scratch(x.shape[:-1] + (w.shape[1],), out.dtype, slot=i % 2)
        runs.append(build_dense(ctx, a, [src, w] + ([b] if b is not None else []), dst))
        src = dst
    return _sequence(*runs)


build_dense.fused_chain = _chain_fits  # the plan may fuse chains of dense layers (fusions.py)


def _padded_source(x, pads, value):
    """(a callable refreshing a padded copy of x, the copy), or (None, x) without padding. The
    copy has its own memory: its border is written once."""
    t, l, b, r = pads
    if not any(pads):
        return None, x
    n, c, h, w = x.shape
    xp = np.empty((n, c, h + t + b, w + l + r), F32)
    xp.fill(value)
    inner = xp[:, :, t:t + h, l:l + w]
    return (lambda: np.copyto(inner, x)), xp


def _windows(xp, kernel, strides, dilations, out_hw, batch_inner=False):
    """A strided view (N, C, kh, kw, OH, OW) of every window tap of xp; with batch_inner,
    (C, kh, kw, N, OH, OW)."""
    sn, sc, sh, sw = xp.strides
    n, c = xp.shape[:2]
    taps = (kernel[0], kernel[1]), (sh * dilations[0], sw * dilations[1])
    out = (out_hw[0], out_hw[1]), (sh * strides[0], sw * strides[1])
    if batch_inner:
        shape = (c,) + taps[0] + (n,) + out[0]
        strides = (sc,) + taps[1] + (sn,) + out[1]
    else:
        shape = (n, c) + taps[0] + out[0]
        strides = (sn, sc) + taps[1] + out[1]
    return as_strided(xp, shape, strides, writeable=False)


FUSED_POOLS = {None: 0, "maxpool": 1, "avgpool": 2}  # conv_direct's codes (fusions._fuse_conv_pool)


def _build_conv_pooled(ctx, attrs, ins, out):
    """A conv with a fused 2x2 stride-2 pool: in the direct kernel where it runs the conv, else
    the conv into a buffer of its own and the native pool after it."""
    x, w = ins[0], ins[1]
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    native = _build_conv_native(ctx, attrs, x, w, bias, None, out)
    if native is not None:
        return native
    hw = G.conv_output_hw(x.shape[2:], w.shape[2:], attrs["strides"], attrs["pads"],
                          attrs["dilations"])
    full = ctx.scratch((x.shape[0], w.shape[0]) + tuple(hw), F32, slot=3)
    conv = build_conv2d(ctx, {k: v for k, v in attrs.items() if k != "pool"}, ins, full)
    window = dict(kernel=(2, 2), strides=(2, 2), pads=(0, 0, 0, 0), dilations=(1, 1))
    return _sequence(conv, build_pool(attrs["pool"])(ctx, window, [full], out))


def build_conv2d(ctx, attrs, ins, out):
    if attrs.get("pool"):
        return _build_conv_pooled(ctx, attrs, ins, out)
    x, w = ins[0], ins[1]
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    groups = attrs["groups"]
    _, _, oh, ow = out.shape
    strides, pads, dil = attrs["strides"], attrs["pads"], attrs["dilations"]
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    residual = ins[3] if len(ins) > 3 else None
    y_rows = out.reshape(n * m, oh * ow)
    native = _build_conv_native(ctx, attrs, x, w, bias, residual, out)
    if native is not None:
        return native
    if groups == 1 and (kh, kw) == (1, 1) and strides == (1, 1) and not any(pads):
        wm = ctx.weight(w, "gemm", lambda a: a.reshape(m, c))
        x3, y3 = x.reshape(n, c, h * wd), out.reshape(n, m, oh * ow)
        if n == 1:
            x2, y2 = x3[0], y3[0]

            def gemm():
                np.matmul(wm, x2, out=y2)
        else:
            def gemm():
                np.matmul(wm, x3, out=y3)
        return _sequence(gemm, epilogue(y_rows, attrs, bias, 0, residual))

    if groups == c and cg == 1 and m == c:
        return _build_depthwise(ctx, attrs, ins, out, bias, residual, y_rows)

    fill, xp = _padded_source(x, pads, 0.0)
    ckk = cg * kh * kw
    if groups == 1 and n > 1:
        # fold the batch into one GEMM: cols [C*kh*kw, N*OH*OW], then [M, N, OH*OW] -> NCHW
        taps = _windows(xp, (kh, kw), strides, dil, (oh, ow), batch_inner=True)
        cols = ctx.scratch((c, kh, kw, n, oh, ow))
        prod = ctx.scratch((m, n, oh * ow), slot=1)
        w2 = ctx.weight(w, "gemm2d", lambda a: a.reshape(m, ckk))
        cols2, prod2 = cols.reshape(ckk, n * oh * ow), prod.reshape(m, n * oh * ow)
        out3 = out.reshape(n, m, oh * ow)
        residual = residual.reshape(out3.shape) if residual is not None else None

        finish = functools.partial(_core.conv_epilogue, prod, out3, bias, residual,
                                   *_activation_args(attrs))

        def gemm():
            np.copyto(cols, taps)
            np.matmul(w2, cols2, out=prod2)
            finish()
        return _sequence(fill, gemm)

    taps = _windows(xp, (kh, kw), strides, dil, (oh, ow))
    cols = ctx.scratch((n, c, kh, kw, oh, ow))
    wm = ctx.weight(w, "gemm", lambda a: a.reshape(groups, m // groups, ckk))
    cols_g = cols.reshape(n, groups, ckk, oh * ow)
    y_g = out.reshape(n, groups, m // groups, oh * ow)
    if groups == 1:
        w2, c2, y2 = wm[0], cols_g[0, 0], y_g[0, 0]

        def gemm():
            np.copyto(cols, taps)
            np.matmul(w2, c2, out=y2)
    else:
        def gemm():
            np.copyto(cols, taps)
            np.matmul(wm, cols_g, out=y_g)
    return _sequence(fill, gemm, epilogue(y_rows, attrs, bias, 0, residual))


# ---- native convolutions and the CPU device's threads (csrc/conv_kernels.cpp) ----

# Direct (stride-1) convolution where the reduction C*kh*kw is short and the kernel has more than
# one tap: im2col's copy and a GEMM with few rows lose there (thin first layers); im2col + SGEMM
# elsewhere, and a 1x1 convolution is a plain SGEMM on its input (2.6x the direct kernel's speed
# for ResNet's 256->64 1x1 on one AVX-512 core). 1-D convolutions (H = 1) take the direct kernel
# where it has AVX-512 (k3 64->64 at b256: 4.5 ms against 5.6 ms through im2col); on AVX2 im2col
# measured faster there (9.7 against 11.5 ms).
DIRECT_MAX_REDUCTION = 384
# With AVX-512 the direct kernel holds the output channels in the vectors (_direct_lanes: 16), a
# tile of 8-14 positions x 32 channels in registers, each input value broadcast from memory; on
# one core it beat im2col + OpenBLAS on every convolution with taps measured, strides 1 and 2
# (ResNet-50's 3x3 layers 0.63-0.91x its time, its 7x7 stride-2 stem 0.62x, jet_cnn's and the
# 1-D ResNet's layers 0.4-0.8x), and stride-1 1x1 convolutions on small images (0.76-0.97x at
# 7x7 and 14x14; 1.1-1.45x at 28x28 and 56x56, where each input channel's plane is a separate
# stream: SGEMM's packed panels win there, as for the stride-2 1x1 downsamples: 1.0-1.9x).
DIRECT_1X1_MAX_POSITIONS = 256


def _direct_wins(x_shape, taps, reduction, strides, out_shape) -> bool:
    """Whether a groups-1 convolution takes conv_direct rather than SGEMM."""
    if _direct_lanes() == 16:
        if taps > 1:
            return strides[1] <= 2
        return strides == (1, 1) and out_shape[2] * out_shape[3] <= DIRECT_1X1_MAX_POSITIONS
    return (strides == (1, 1) and taps > 1 and reduction <= DIRECT_MAX_REDUCTION
            and x_shape[2] > 1)
_threads = {"n": None, "blas": None, "limit": None}


def _default_threads() -> int:
    import os
    env = os.environ.get("OFFLOAD_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n
        import warnings
        warnings.warn(f"OFFLOAD_NUM_THREADS={env!r} is not a positive integer: ignored")
    return _cpu_count()


def set_num_threads(n: int) -> None:
    """Threads the cpu device uses for one large op, the calling thread included (``n`` >= 1).
    Ops below ~2 million multiply-adds always run on the calling thread alone. offload's
    products call NumPy's OpenBLAS from this pool, one thread per task, and OpenBLAS's own
    (spinning) pool is limited to one thread through threadpoolctl, for NumPy's products in this
    process too; with another BLAS than OpenBLAS, its threads are limited to ``n``.
    Default: ``OFFLOAD_NUM_THREADS``, else the cores this process may run on
    (``os.sched_getaffinity``)."""
    import numbers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 4096:
        from ..errors import ArgumentError
        raise ArgumentError(f"set_num_threads: expected an int from 1 to 4096, got "
                            f"{type(n).__name__} {n!r}")
    native = native_blas()  # locate the BLAS first (threadpoolctl)
    _core.set_num_threads(int(n))
    _threads["n"] = int(n)
    try:
        import threadpoolctl
        # offload's products call OpenBLAS from its own pool, one thread each: OpenBLAS's
        # pool (which spins after each call) is held at one thread; another BLAS gets n
        _threads["limit"] = threadpoolctl.threadpool_limits(limits=1 if native else int(n),
                                                            user_api="blas")
    except ImportError:  # a core dependency; tolerated for a source tree without it
        pass


def get_num_threads() -> int:
    """The number of threads the cpu device uses for one large op (see set_num_threads)."""
    if _threads["n"] is None:
        set_num_threads(_default_threads())
    return _threads["n"]


def native_blas() -> bool:
    """True when the SGEMM of NumPy's OpenBLAS is called from _core (found once through
    threadpoolctl); else large products go through np.matmul."""
    if _threads["blas"] is None:
        name = ""
        try:
            import threadpoolctl
            for lib in threadpoolctl.ThreadpoolController().select(
                    internal_api="openblas").lib_controllers:
                name = _core.blas_load(lib.filepath)
                if name:
                    break
        except ImportError:
            pass
        _threads["blas"] = name
    return bool(_threads["blas"])


def _pack_direct(a, lanes=8):
    """[M, C, kh, kw] -> [ceil(M/lanes), C, kh, kw, lanes] (zeros past M), conv_direct's
    layouts: 8 lanes for the kernel with positions in the vectors, 16 (AVX-512 only) for the one
    with output channels in the vectors."""
    m = a.shape[0]
    blocks = -(-m // lanes)
    p = np.zeros((blocks * lanes,) + a.shape[1:], F32)
    p[:m] = a
    return np.ascontiguousarray(p.reshape((blocks, lanes) + a.shape[1:]).transpose(0, 2, 3, 4, 1))


def _direct_lanes() -> int:
    """conv_direct's weight layout on this CPU: output channels in 16-lane vectors on AVX-512."""
    return 16 if _core.simd() == "avx512" else 8


def _build_conv_native(ctx, attrs, x, w, bias, residual, out):
    """conv_direct or conv_gemm for a groups-1 float32 conv, or None (the NumPy paths)."""
    if attrs["groups"] != 1 or x.dtype != F32 or out.dtype != F32:
        return None
    m, c, kh, kw = w.shape
    strides, pads, dil = attrs["strides"], attrs["pads"], attrs["dilations"]
    if max(kh, kw, *strides, *dil, *pads) > NATIVE_WINDOW_MAX:  # the kernels' limits
        return None
    act = _activation_args(attrs)
    if _direct_wins(x.shape, kh * kw, c * kh * kw, tuple(strides), out.shape):
        lanes = _direct_lanes()
        wp = ctx.weight(w, f"direct{lanes}", functools.partial(_pack_direct, lanes=lanes))
        return functools.partial(_core.conv_direct, x, wp, bias, residual, out, m, list(pads),
                                 list(dil), *act, pool=FUSED_POOLS[attrs.get("pool")],
                                 strides=list(strides))
    if attrs.get("pool") or not native_blas():
        return None
    w2 = ctx.weight(w, "gemm2d", lambda a: a.reshape(m, c * kh * kw))
    return functools.partial(_core.conv_gemm, x, w2, bias, residual, out, kh, kw, list(strides),
                             list(pads), list(dil), *act)


def _build_depthwise(ctx, attrs, ins, out, bias, residual, y_rows):
    """Depthwise conv: one multiply-add over the whole tensor per kernel tap."""
    x, w = ins[0], ins[1]
    m, _, kh, kw = w.shape
    n, _, oh, ow = out.shape
    fill, xp = _padded_source(x, attrs["pads"], 0.0)
    taps = _windows(xp, (kh, kw), attrs["strides"], attrs["dilations"], (oh, ow))
    wt = ctx.weight(w, "taps", lambda a: a.reshape(m, kh * kw).T.reshape(kh, kw, m, 1, 1).copy())
    tmp = ctx.scratch(out.shape)

    def conv():
        np.multiply(taps[:, :, 0, 0], wt[0, 0], out=out)
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    np.multiply(taps[:, :, i, j], wt[i, j], out=tmp)
                    np.add(out, tmp, out=out)
    return _sequence(fill, conv, epilogue(y_rows, attrs, bias, 0, residual))


NATIVE_WINDOW_MAX = 1 << 20  # _core.pool2d's largest kernel size, stride and dilation


def build_pool(kind):
    def build(ctx, attrs, ins, out):
        x = ins[0]
        n, c, h, w = x.shape
        _, _, oh, ow = out.shape
        (kh, kw), strides, dil = attrs["kernel"], attrs["strides"], attrs["dilations"]
        t, l, b, r = attrs["pads"]
        # the native pool's limits (kernel, strides, dilations up to 2**20): NumPy beyond them
        native_ok = x.dtype == F32 and out.dtype == F32 and \
            max(kh, kw, *strides, *dil) <= NATIVE_WINDOW_MAX
        if (not any((t, l, b, r)) and native_ok
                and oh == (h - dil[0] * (kh - 1) - 1) // strides[0] + 1
                and ow == (w - dil[1] * (kw - 1) - 1) // strides[1] + 1):
            return functools.partial(_core.pool2d, x, out, kind == "maxpool", [kh, kw],
                                     list(strides), list(dil))
        scale = _avg_divisor(attrs, (h, w), (oh, ow)) if kind == "avgpool" else None
        value = -np.inf if kind == "maxpool" else 0.0
        # the padded rows/columns the windows read, exactly (ceil_mode: past the pads)
        hn = (oh - 1) * strides[0] + dil[0] * (kh - 1) + 1
        wn = (ow - 1) * strides[1] + dil[1] * (kw - 1) + 1
        if native_ok and min(h, hn - t) > 0 and min(w, wn - l) > 0:
            # padded windows: a padded copy (border written once), then the native pool on it;
            # averages rescaled from 1 / (kh * kw) to the divisor count_include_pad says
            xp = np.full((n, c, hn, wn), value, F32)
            rows, cols = min(h, hn - t), min(w, wn - l)
            inner, src = xp[:, :, t:t + rows, l:l + cols], x[:, :, :rows, :cols]
            fix = None if scale is None else scale * F32(kh * kw)
            native = functools.partial(_core.pool2d, xp, out, kind == "maxpool", [kh, kw],
                                       list(strides), list(dil))
            return _sequence(lambda: np.copyto(inner, src), native,
                             None if fix is None or np.all(fix == 1) else
                             (lambda: np.multiply(out, fix, out=out)))
        # extend the bottom/right pad so ceil_mode windows stay inside the padded copy
        b = max(b, hn - (h + t))
        r = max(r, wn - (w + l))
        fill, xp = _padded_source(x, (t, l, b, r), value)
        taps = _windows(xp, (kh, kw), strides, dil, (oh, ow))
        reduce = np.maximum if kind == "maxpool" else np.add

        def pool():
            np.copyto(out, taps[:, :, 0, 0])
            for i in range(kh):
                for j in range(kw):
                    if i or j:
                        reduce(out, taps[:, :, i, j], out=out)
            if scale is not None:
                np.multiply(out, scale, out=out)
        return _sequence(fill, pool)
    return build


def _avg_divisor(attrs, in_hw, out_hw):
    """1 / (number of elements counted) for every output position, as float32 [OH, OW]."""
    counts = []
    for axis in range(2):
        k, s, d = attrs["kernel"][axis], attrs["strides"][axis], attrs["dilations"][axis]
        begin, end = attrs["pads"][axis], attrs["pads"][axis + 2]
        size = in_hw[axis]
        row = []
        for o in range(out_hw[axis]):
            positions = [o * s - begin + i * d for i in range(k)]
            if attrs.get("count_include_pad", 0):
                row.append(sum(1 for p in positions if p < size + end))
            else:
                row.append(sum(1 for p in positions if 0 <= p < size))
        counts.append(np.array(row, np.float64))
    return (1.0 / np.outer(counts[0], counts[1])).astype(F32)


def build_global_avgpool(ctx, attrs, ins, out):
    x = ins[0]
    n, c = x.shape[:2]
    if _c_float32(x, out) and x.size:  # the native mean over each plane, on the pool
        return functools.partial(_core.reduce, x.reshape(n * c, -1, 1), out.reshape(n * c, 1),
                                 "mean")
    x3 = x.reshape(n, c, -1)
    y2 = out.reshape(n, c)
    return lambda: np.mean(x3, axis=2, out=y2)


def build_binary(fn):
    def build(ctx, attrs, ins, out):
        return binary_into(fn, out, *ins)
    return build


def build_activation(ctx, attrs, ins, out):
    x = ins[0]
    y2 = out.reshape(1, -1)
    return _sequence(functools.partial(np.copyto, out, x), epilogue(y2, attrs))


SOFTMAX_BLOCK = 1 << 15  # elements per block of the fused softmax: stays in L2


def build_softmax(ctx, attrs, ins, out):
    x, axis = ins[0], attrs["axis"]
    if "scale" in attrs:  # softmax(x * scale + bias) over the last axis (plan fusion)
        return _softmax_scaled(x, ins[1], F32(attrs["scale"]), out)
    if axis == x.ndim - 1:
        return NativeStep("softmax", x, out)
    red_shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape))
    tmp = np.empty(red_shape, F32)

    def softmax():
        np.max(x, axis=axis, keepdims=True, out=tmp)
        np.subtract(x, tmp, out=out)
        with np.errstate(under="ignore", invalid="ignore"):
            np.exp(out, out=out)
        np.sum(out, axis=axis, keepdims=True, out=tmp)
        np.divide(out, tmp, out=out)
    return softmax


def _bias_row_divisor(bias_shape, shape):
    """For a bias broadcast over ``shape`` whose rows (all axes but the last) it repeats in a
    pattern _core.softmax_scaled takes: row r of x adds bias row (r // div) % bias_rows. The
    divisor ``div``, or None (the last axis broadcast, or full axes not in one run)."""
    lead = len(shape) - 1
    b = (1,) * (len(shape) - len(bias_shape)) + tuple(bias_shape)
    if not lead or b[-1] != shape[-1] or any(d not in (1, s) for d, s in zip(b, shape)):
        return None
    full = [i for i in range(lead) if b[i] == shape[i] != 1]
    if full and any(b[i] != shape[i] for i in range(full[0], full[-1] + 1)):
        return None  # a broadcast axis between two full ones
    return int(np.prod(shape[full[-1] + 1:lead])) if full else 1


def _softmax_scaled(x, bias, scale, out):
    """softmax(x * scale + bias) over the last axis in blocks of rows that stay in cache: one
    pass over memory instead of three (scale, add, softmax). Each block subtracts its own
    maximum (one contiguous reduction instead of one per row); rows whose sum then falls below
    1e-20 (far below the block's maximum) are redone with their own maximum."""
    n = x.shape[-1]
    div = _bias_row_divisor(bias.shape, x.shape)
    if div and _c_float32(x, out, bias):  # one pass per row, on the pool
        return functools.partial(_core.softmax_scaled, x, bias, scale, div, out)
    x2, y2 = x.reshape(-1, n), out.reshape(-1, n)
    b2 = bias.reshape(-1, n) if bias.shape == x.shape else None
    rows = x2.shape[0]
    block = max(1, SOFTMAX_BLOCK // max(n, 1))
    tmp = np.empty((block, 1), F32)
    spans = [(a, min(rows, a + block)) for a in range(0, rows, block)]

    def redo(a, bad):
        full = b2 if b2 is not None else np.broadcast_to(bias, x.shape).reshape(-1, n)
        pre = x2[a + bad] * scale + full[a + bad]
        pre -= pre.max(axis=1, keepdims=True)
        np.exp(pre, out=pre)
        y2[a + bad] = pre / pre.sum(axis=1, keepdims=True)

    def run():
        with np.errstate(under="ignore", invalid="ignore", over="ignore", divide="ignore"):
            if b2 is None:  # a bias broadcast over some axes: one full pass first
                np.multiply(x, scale, out=out)
                np.add(out, bias, out=out)
            for a, e in spans:
                y, t = y2[a:e], tmp[:e - a]
                if b2 is not None:
                    np.multiply(x2[a:e], scale, out=y)
                    y += b2[a:e]
                y -= y.max()
                np.exp(y, out=y)
                np.sum(y, axis=1, keepdims=True, out=t)
                y /= t
                if not t.min() >= 1e-20:  # (NaN too)
                    redo(a, np.flatnonzero(~(t[:, 0] >= 1e-20)))
    return run


build_softmax.scale_bias = True  # the plan may fuse a constant scale and a bias add into it


NATIVE_VIEW_MIN = 1 << 14  # elements: below this NumPy's own loop is as fast as a native call


def copy_into(out, src):
    """A step writing ``src`` (broadcast to ``out``'s shape; any strides: a transposed, sliced,
    tiled or expanded view) into ``out``: one native strided copy on the pool
    (_core.copy_view), or NumPy's copyto for small or overlapping arrays."""
    view = np.broadcast_to(src, out.shape)
    if out.size >= NATIVE_VIEW_MIN and view.dtype == out.dtype and \
            view.dtype.itemsize in (1, 2, 4, 8) and not np.may_share_memory(view, out):
        return functools.partial(_core.copy_view, view, out)
    return functools.partial(np.copyto, out, src)


BINARY_CODES = {np.add: 0, np.subtract: 1, np.multiply: 2, np.divide: 3, np.maximum: 4,
                np.minimum: 5}  # _core.binary_view's ops


def binary_into(ufunc, out, a, b):
    """A step ``out = ufunc(a, b)`` with broadcasting: for large float32 arrays one native pass
    on the pool (_core.binary_view), else the ufunc itself (a division by zero gives inf or NaN
    without a warning)."""
    code = BINARY_CODES.get(ufunc)
    if code is not None and out.size >= NATIVE_VIEW_MIN and \
            {np.asarray(a).dtype, np.asarray(b).dtype, out.dtype} == {np.dtype(F32)}:
        va, vb = np.broadcast_to(a, out.shape), np.broadcast_to(b, out.shape)
        if not (np.may_share_memory(va, out) or np.may_share_memory(vb, out)):
            return functools.partial(_core.binary_view, va, vb, out, code)

    if ufunc is not np.divide:  # (no errstate: it costs about a microsecond per call)
        return functools.partial(ufunc, a, b, out=out)

    def divide():
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(a, b, out=out)
    return divide


def build_concat(ctx, attrs, ins, out):
    axis, at, parts = attrs["axis"], 0, []
    for x in ins:  # each input into its part of out (broadcast along the other axes)
        part = out[(slice(None),) * axis + (slice(at, at + x.shape[axis]),)]
        at += x.shape[axis]
        if part.size:
            parts.append(copy_into(part, x))
    return _sequence(*parts)


build_concat.broadcasts = True  # the plan may hand it an Expand's input (fusions._elide_expands)


def _lines(x, axes):
    """x [..., n, ...] as the view [outer, n, inner] over its consecutive ``axes`` (as
    _core.topk and _core.reduce read it), or None (another dtype than float32, axes apart, not
    C-contiguous)."""
    if (x.dtype != F32 or not x.flags.c_contiguous
            or tuple(axes) != tuple(range(axes[0], axes[-1] + 1))):
        return None
    s = x.shape
    return x.reshape(math.prod(s[:axes[0]]), math.prod(s[axes[0]:axes[-1] + 1]),
                     math.prod(s[axes[-1] + 1:]))


NATIVE_REDUCE = ("sum", "mean", "max", "min")
NATIVE_TOPK_K = 64  # a bounded insertion per line: above this, NumPy's sort


def build_reduce(ctx, attrs, ins, out):
    x, axes = ins[0], attrs["axes"]
    if not axes:
        return lambda: np.copyto(out, x)
    keep_shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    y = out.reshape(keep_shape)
    fn = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min,
          "prod": np.prod}[attrs["fn"]]
    if attrs["fn"] in ("max", "min") and not x.size:  # over an empty set: ONNX's identity
        dt = np.dtype(x.dtype)
        big = True if dt.kind == "b" else np.iinfo(dt).max if dt.kind in "iu" else np.inf
        low = False if dt.kind == "b" else np.iinfo(dt).min if dt.kind in "iu" else -np.inf
        value = low if attrs["fn"] == "max" else big
        return lambda: y.fill(value)
    x3 = _lines(x, axes) if attrs["fn"] in NATIVE_REDUCE else None
    if x3 is not None and out.dtype == F32 and out.flags.c_contiguous:
        return functools.partial(_core.reduce, x3, out.reshape(x3.shape[0], x3.shape[2]),
                                 attrs["fn"])
    return lambda: fn(x, axis=axes, keepdims=True, out=y)


def build_pad(ctx, attrs, ins, out):
    x = ins[0]
    begin, end, value = attrs["begin"], attrs["end"], F32(attrs.get("value", 0.0))
    src = tuple(slice(max(-bg, 0), d - max(-e, 0)) for d, bg, e in zip(x.shape, begin, end))
    dst = tuple(slice(max(bg, 0), max(bg, 0) + (s.stop - s.start)) for bg, s in zip(begin, src))
    inner_src, inner_dst = x[src], out[dst]

    def pad():
        out.fill(value)
        np.copyto(inner_dst, inner_src)
    return pad


def build_transpose(ctx, attrs, ins, out):
    return copy_into(out, ins[0].transpose(attrs["perm"]))


# elementwise rows with a NumPy ufunc writing into the output (float operands of one dtype)
UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
          "min": np.minimum, "neg": np.negative, "abs": np.abs, "sqrt": np.sqrt, "exp": np.exp,
          "log": np.log, "floor": np.floor, "ceil": np.ceil, "atan": np.arctan, "tanh": np.tanh,
          "sin": np.sin, "cos": np.cos, "equal": np.equal, "less": np.less,
          "greater": np.greater, "less_equal": np.less_equal, "greater_equal": np.greater_equal,
          "and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor,
          "not": np.logical_not, "div": np.divide}


def _erf_into(x, out, t):
    """erf(x) into ``out`` in float32 with one temporary ``t`` (Abramowitz & Stegun 7.1.26,
    |error| < 1.5e-7 + float32 rounding): a few passes, no float64 copies."""
    np.abs(x, out=t)
    np.multiply(t, F32(0.3275911), out=out)
    out += F32(1.0)
    np.reciprocal(out, out=out)          # out = s = 1 / (1 + p |x|)
    np.multiply(t, t, out=t)
    np.negative(t, out=t)
    np.exp(t, out=t)                     # t = exp(-x^2)
    poly = out * F32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += F32(c)
        poly *= out
    poly *= t
    np.subtract(F32(1.0), poly, out=out)
    np.copysign(out, x, out=out)


def _c_float32(*arrays):
    """Whether every array is C-contiguous float32 (what the native kernels take as they are)."""
    return all(a.dtype == F32 and a.flags.c_contiguous for a in arrays)


def build_erf(ctx, attrs, ins, out):
    x, fn = ins[0], attrs["fn"]
    if _c_float32(x, out):  # one pass per block, on the pool
        return functools.partial(_core.gelu, x, out, fn == "gelu")
    t = np.empty(out.shape, F32)
    if fn == "erf":
        return lambda: _erf_into(x, out, t)
    # 0.5 x (1 + erf(x / sqrt 2)) in blocks that stay in cache (the erf's passes then run
    # from L2, not memory); the written-out GELU of PyTorch's exports is fused into this
    xf, of = x.reshape(-1), out.reshape(-1)
    block = min(xf.size, GELU_BLOCK) or 1
    t, u = np.empty(block, F32), np.empty(block, F32)
    spans = [(a, min(xf.size, a + block)) for a in range(0, xf.size, block)]

    def gelu():
        for a, e in spans:
            xs, ys, ts, us = xf[a:e], of[a:e], t[:e - a], u[:e - a]
            np.multiply(xs, F32(0.7071067811865476), out=us)
            _erf_into(us, ys, ts)
            ys += F32(1.0)
            ys *= xs
            ys *= F32(0.5)
    return gelu


GELU_BLOCK = 1 << 15  # elements per block of the cpu gelu


def build_elementwise(ctx, attrs, ins, out):
    """A row of offload.elementwise.TABLE in NumPy: a ufunc into ``out`` where one fits, else
    the row's NumPy expression copied into ``out``."""
    fn = attrs["fn"]
    ufunc = UFUNCS.get(fn)
    kinds = {np.asarray(x).dtype for x in ins}
    if fn == "copy":  # (and Expand: the copy broadcast to a larger shape)
        return copy_into(out, ins[0])
    if fn in ("erf", "gelu") and kinds == {np.dtype(F32)} and out.shape == ins[0].shape:
        return build_erf(ctx, attrs, ins, out)
    if ufunc in BINARY_CODES and len(ins) == 2 and kinds == {np.dtype(F32)} \
            and out.size >= NATIVE_VIEW_MIN:
        return binary_into(ufunc, out, *ins)
    if ufunc is not None and kinds == {np.dtype(F32)}:
        def run():
            with np.errstate(all="ignore"):
                ufunc(*ins, out=out)
        return run
    if fn == "muladd" and kinds == {np.dtype(F32)} and not np.shares_memory(out, ins[2]):
        a, b, c = ins  # (a BatchNormalization left as a per-channel scale and shift)

        def muladd():  # into out: no temporaries (each a fresh, page-faulted block when large)
            np.multiply(a, b, out=out)
            np.add(out, c, out=out)
        return muladd
    if fn == "where":
        cond, a, b = ins
        return lambda: np.copyto(out, np.where(cond, a, b))
    row = EW.TABLE[fn]
    p = list(EW.params(attrs)) + [0.0, 0.0]
    p0, p1 = F32(p[0]), F32(p[1])
    if fn == "cast":
        x = ins[0]
        if out.dtype == np.bool_:
            return lambda: np.not_equal(x, 0, out=out)
        return lambda: np.copyto(out, x, casting="unsafe")

    def run():
        with np.errstate(all="ignore"):
            np.copyto(out, row.numpy(*ins, p0, p1), casting="unsafe")
    return run


def build_slice(ctx, attrs, ins, out):
    x = ins[0]
    if not out.size:
        return lambda: None
    base = sum(s * st for s, st in zip(attrs["starts"], x.strides)) // x.itemsize
    strides = tuple(st * step for st, step in zip(x.strides, attrs["steps"]))
    view = as_strided(x.reshape(-1)[base:], out.shape, strides, writeable=False)
    return copy_into(out, view)


def build_tile(ctx, attrs, ins, out):
    x, reps = ins[0], attrs["repeats"]
    dims = tuple(d for r, s in zip(reps, x.shape) for d in (r, s))
    src = as_strided(x, dims, tuple(v for s in x.strides for v in (0, s)), writeable=False)
    return copy_into(out.reshape(dims), src)


def build_matmul(ctx, attrs, ins, out):
    """MatMul of two run-time tensors: batched products on the pool where a carries every batch
    axis of the output and b all of them or none (attention: [N, H, P, d] @ [N, H, d, P]);
    else NumPy's matmul."""
    a, b = ins
    if a.ndim >= 3 and b.ndim >= 2 and out.ndim == a.ndim and _c_float32(a, b, out) \
            and native_blas():
        batch = out.shape[:-2]
        b_batch = (1,) * (out.ndim - b.ndim) + b.shape[:-2]
        if a.shape[:-2] == batch and (b_batch == batch or math.prod(b_batch) == 1):
            bn = math.prod(batch)
            return functools.partial(_core.matmul_batched, a.reshape(bn, *a.shape[-2:]),
                                     b.reshape(-1, *b.shape[-2:]),
                                     out.reshape(bn, *out.shape[-2:]))
    return lambda: np.matmul(a, b, out=out)


def _check_indices(attrs, idx, size, axis, op):
    lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (0, 0)
    if lo < -size or hi >= size:
        _raise_index(attrs, idx, np.int64(size), lambda p: axis, op)


def _raise_index(attrs, idx, sizes, axis_of, op):
    from .. import checks
    from ..errors import ShapeError
    p = checks.first_bad_index(idx, sizes)
    if p is not None:
        raise ShapeError(checks.index_message(
            op, attrs.get("node", ""), int(idx.reshape(-1)[p]), np.unravel_index(p, idx.shape),
            axis_of(p), int(np.broadcast_to(sizes, idx.shape).reshape(-1)[p])))


def build_gather(ctx, attrs, ins, out):
    x, idx, axis = ins[0], ins[1], attrs["axis"]
    size = x.shape[axis]

    def run():
        _check_indices(attrs, idx, size, axis, "Gather")
        np.take(x, idx, axis=axis, out=out, mode="wrap")
    return run


def build_gather_elements(ctx, attrs, ins, out):
    x, idx, axis = ins[0], ins[1], attrs["axis"]
    size = x.shape[axis]
    region = x[tuple(slice(0, d) if k != axis else slice(None)
                     for k, d in enumerate(idx.shape))]

    def run():
        _check_indices(attrs, idx, size, axis, "GatherElements")
        np.copyto(out, np.take_along_axis(region, np.where(idx < 0, idx + size, idx), axis))
    return run


def build_gather_nd(ctx, attrs, ins, out):
    x, idx = ins[0], ins[1]
    q = idx.shape[-1]
    sizes = np.array(x.shape[:q], np.int64)
    flat = x.reshape((-1,) + x.shape[q:])
    weights = np.array([math.prod(x.shape[j + 1:q]) for j in range(q)], np.int64)
    out2 = out.reshape((-1,) + x.shape[q:])

    def run():
        if idx.size and ((idx < -sizes).any() or (idx >= sizes).any()):
            _raise_index(attrs, idx, sizes, lambda p: p % q, "GatherND")
        lin = (np.where(idx < 0, idx + sizes, idx) @ weights).reshape(-1)
        np.take(flat, lin, axis=0, out=out2)
    return run


def build_layernorm(ctx, attrs, ins, out):
    rows, size, eps = attrs["rows"], attrs["size"], F32(attrs["epsilon"])
    x2, y2 = ins[0].reshape(rows, size), out.reshape(rows, size)
    scale = ins[1].reshape(size)
    bias = ins[2].reshape(size) if len(ins) > 2 else None
    if _c_float32(x2, y2, scale, *([bias] if bias is not None else [])):
        return functools.partial(_core.layernorm, x2, scale, bias, float(eps), y2)
    mean, var = np.empty((rows, 1), F32), np.empty((rows, 1), F32)

    def run():
        np.mean(x2, axis=1, keepdims=True, out=mean)
        np.subtract(x2, mean, out=y2)
        np.mean(np.square(y2), axis=1, keepdims=True, out=var)
        np.add(var, eps, out=var)
        np.sqrt(var, out=var)
        np.divide(y2, var, out=y2)
        np.multiply(y2, scale, out=y2)
        if bias is not None:
            np.add(y2, bias, out=y2)
    return run


def build_scatter_nd(ctx, attrs, ins, out):
    x, idx, u = ins
    q = idx.shape[-1]
    sizes = np.array(x.shape[:q], np.int64)

    def run():
        if idx.size and ((idx < -sizes).any() or (idx >= sizes).any()):
            _raise_index(attrs, idx, sizes, lambda p: p % q, "ScatterND")
        np.copyto(out, x)
        out[tuple(np.moveaxis(np.where(idx < 0, idx + sizes, idx), -1, 0))] = u
    return run


def build_cumsum(ctx, attrs, ins, out):
    x, axis = ins[0], attrs["axis"]
    reverse, exclusive = attrs.get("reverse", 0), attrs.get("exclusive", 0)
    src = np.flip(x, axis) if reverse else x
    dst = np.flip(out, axis) if reverse else out

    def run():
        np.cumsum(src, axis=axis, out=dst)
        if exclusive:
            np.subtract(dst, src, out=dst)
    return run


def build_topk(ctx, attrs, ins, out):
    x, axis, k = ins[0], attrs["axis"], attrs["k"]
    largest = attrs.get("largest", 1)
    x3 = _lines(x, (axis,)) if k <= NATIVE_TOPK_K else None
    if x3 is not None and out.dtype == np.int64 and out.flags.c_contiguous:
        return functools.partial(_core.topk, x3, out.reshape(x3.shape[0], k, x3.shape[2]),
                                 bool(largest))
    first = np.arange(k)

    def run():
        key = np.negative(x) if largest else x
        order = np.argsort(key, axis=axis, kind="stable")
        np.copyto(out, np.take(order, first, axis=axis))
    return run


# ------------------------------------------------------------------------------ recurrent layers

def pack_columns(w):
    """w [k, n] as [ceil(n / 16), k, 16]: its columns in panels of 16 (zeros past n), each
    contiguous, as _core.dense_packed streams them."""
    k, n = w.shape
    cols = np.zeros((1, k, _pad16(n)), F32)
    cols[0, :, :n] = w
    return _panels(cols)[0]


def _panels(cols):
    """[D, K, N] columns (N a multiple of 16) as [D, N / 16, K, 16]: panels of 16 columns,
    each contiguous (the layout _core.rnn streams)."""
    d, k, n = cols.shape
    return np.ascontiguousarray(cols.reshape(d, k, n // 16, 16).transpose(0, 2, 1, 3), F32)


def _pad16(n):
    return -(-n // 16) * 16


def rnn_packed_rt(r, cell):
    """R [D, G*H, H] as R^T [D, H, NP] in gate segments padded to 16 columns (LSTM: one of 4H;
    GRU: z, r | h), in panels (_panels)."""
    d, gh, h = r.shape
    rt = np.transpose(r, (0, 2, 1))
    if cell == "lstm":
        out = np.zeros((d, h, _pad16(4 * h)), F32)
        out[:, :, :4 * h] = rt
    else:
        s1 = _pad16(2 * h)
        out = np.zeros((d, h, s1 + _pad16(h)), F32)
        out[:, :, :2 * h] = rt[:, :, :2 * h]
        out[:, :, s1:s1 + h] = rt[:, :, 2 * h:]
    return _panels(out)


def rnn_packed_wt(w):
    """W [D, G*H, I] as W^T [D, I, G*H padded to 16] in panels, per direction (pack_columns)."""
    return np.stack([pack_columns(wd.T) for wd in w])


def rnn_threads(work: int) -> int:
    """Threads for one LSTM/GRU layer of ``work`` multiply-adds: the cpu device's pool
    (set_num_threads / OFFLOAD_NUM_THREADS); one for small layers, whose threads would cost
    more than they save."""
    return 1 if work < (1 << 22) else get_num_threads()


def build_rnn(ctx, attrs, ins, out):
    """LSTM/GRU: one _core.rnn call (the time loop, each step's input projection in it),
    weights packed once (run-time weights: on every run)."""
    from .. import checks
    get, (t, b, i, d, h, g) = rnn_weights(attrs, ins)
    cell = attrs["cell"]
    x = get["x"] if not isinstance(get["x"], np.ndarray) else np.ascontiguousarray(get["x"], F32)
    b_in, p_in = get.get("b"), get.get("p")
    split = lambda a: (a[:, :g * h].astype(F32), a[:, g * h:].astype(F32))  # noqa: E731
    if attrs.get("constant_weights"):
        wtp = ctx.weight(get["w"], "rnn_wtp", rnn_packed_wt)
        rt = ctx.weight(get["r"], "rnn_rt", lambda a: rnn_packed_rt(a, cell))
        if b_in is not None:
            wb = ctx.weight(b_in, "rnn_wb", lambda a: split(a)[0])
            rb = ctx.weight(b_in, "rnn_rb", lambda a: split(a)[1])
        else:
            wb = rb = np.zeros((d, g * h), F32)
        p = ctx.weight(p_in, "rnn_p", lambda a: a.astype(F32)) if p_in is not None else None
        refresh = None
    else:  # run-time weights: packed again on every run
        w, r = get["w"], get["r"]
        wtp, rt = rnn_packed_wt(np.zeros(w.shape, F32)), rnn_packed_rt(r * 0, cell)
        wb, rb = np.zeros((d, g * h), F32), np.zeros((d, g * h), F32)
        p = np.empty(p_in.shape, F32) if p_in is not None else None

        def refresh():
            np.copyto(wtp, rnn_packed_wt(w))
            np.copyto(rt, rnn_packed_rt(r, cell))
            if b_in is not None:
                np.copyto(wb, split(b_in)[0])
                np.copyto(rb, split(b_in)[1])
            if p is not None:
                np.copyto(p, p_in)
    state = [np.ascontiguousarray(get[k], F32) if isinstance(get.get(k), np.ndarray)
             else get.get(k) for k in ("h0", "c0")]
    lens = get.get("seq")
    label = f"{cell.upper()} node {attrs.get('node', '')!r}"
    code = {"forward": 0, "reverse": 1, "bidirectional": 2}[attrs["direction"]]
    threads = rnn_threads(t * b * d * (h * rt.shape[1] + i * wtp.shape[1]) * 16)
    args = (0 if cell == "lstm" else 1, code, x, wtp, rt, wb, rb, p)
    tail = (state[0], state[1], out, float(attrs.get("clip", 0.0)),
            bool(attrs.get("input_forget", 0)), bool(attrs.get("linear_before_reset", 0)),
            threads)

    def run():
        seq = None
        if lens is not None:
            seq = np.ascontiguousarray(lens, np.int32)
            checks.check_sequence_lens(label, lens, t)
        if refresh is not None:
            refresh()
        _core.rnn(*args, seq, *tail)
    return run

build_conv2d.fused_pool = True  # the plan may fuse a following 2x2 pool into it (fusions.py)

OPS = {
    "rnn": build_rnn,
    "elementwise": build_elementwise,
    "slice": build_slice,
    "tile": build_tile,
    "matmul": build_matmul,
    "gather": build_gather,
    "gather_elements": build_gather_elements,
    "gather_nd": build_gather_nd,
    "cumsum": build_cumsum,
    "scatter_nd": build_scatter_nd,
    "layernorm": build_layernorm,
    "topk": build_topk,
    "conv2d": build_conv2d,
    "dense": build_dense,
    "maxpool": build_pool("maxpool"),
    "avgpool": build_pool("avgpool"),
    "global_avgpool": build_global_avgpool,
    "add": build_binary(np.add),
    "sub": build_binary(np.subtract),
    "mul": build_binary(np.multiply),
    "div": build_binary(np.divide),
    "activation": build_activation,
    "softmax": build_softmax,
    "concat": build_concat,
    "reduce": build_reduce,
    "pad": build_pad,
    "transpose": build_transpose,
}
assert set(OPS) == G.DEVICE_OPS
# Nodes annotated with a fixed-point type (offload.fpga.fixed_point.annotate) run the bit-exact
# ap_fixed emulation of offload.fpga.quant; every other node takes the float32 builder above, as is.
for _op in fixed_point.FIXED_OPS:
    OPS[_op] = fixed_point.build_cpu(_op, OPS[_op])


class CPUDevice(Device):
    """NumPy on the host's cores."""

    kind = "cpu"
    index = 0
    ops = OPS
    capabilities = Capabilities(frozenset(OPS), dtypes=ALL_DTYPES,
                                precisions=frozenset({"float32", fixed_point.FAMILY}))
    reads_host_arrays = True

    def __init__(self):
        import platform
        self.name = f"NumPy {np.__version__} on {platform.machine()} ({_cpu_count()} cores)"
        get_num_threads()  # the pool and the BLAS limit, once per process

    def alloc(self, nbytes):
        return aligned_empty(nbytes)

    def view(self, raw, shape, dtype=F32):
        count = math.prod(shape)
        return raw[:count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def upload(self, array):
        return np.ascontiguousarray(array, dtype=F32 if array.dtype.kind == "f" else None)

    def copy_in(self, dst, src):
        dst[...] = src  # the model checked the dtype: same-kind casting
        return dst.nbytes

    def copy_out(self, dst, src):
        dst[...] = src
        return dst.nbytes

    def device_array(self, src):
        return src.copy()

    def finalize(self, runs):
        return merge_native_steps(runs)


def _cpu_count():
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def discover():
    return [DeviceInfo("cpu:0", True, CPUDevice().name, open=CPUDevice)]
