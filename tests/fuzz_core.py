"""A fuzz harness for ``offload._core``: every binding called with what a byte string decodes to.

``one_input(data)`` reads a byte string as a program: which binding to call and with what
arguments (arrays of fuzzed rank, sizes, dtype, strides, writeability and overlap; sequences
whose ``__getitem__`` makes temporaries or lies about their length; HostBuffer subclasses that
skip the base ``__init__``; Program ops whose arrays are dropped before ``run()``). A binding
may refuse with TypeError, ValueError, BufferError, MemoryError or OverflowError; anything else
is a finding, and so is a result that disagrees with NumPy, a crash, or a sanitizer report.

    tests/test_core.py::test_fuzz_core_seeded   a few hundred seeded inputs, in the default run
                                                 (and under ASan in `.ci/run asan`)
    .ci/run fuzz [SECONDS]                       coverage-guided: atheris + libFuzzer on a
                                                 clang build of _core with libFuzzer's coverage,
                                                 then the corpus replayed under ASan + UBSan
    python tests/fuzz_core.py -runs=N            atheris on the _core that is installed
    python tests/fuzz_core.py --replay DIR       every input of a corpus once (a crash file:
                                                 put it in a folder of its own)
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

def _fuzz_with_atheris(argv) -> None:
    """libFuzzer (atheris) drives one_input. _core is imported at the first input, once
    atheris has loaded its libFuzzer: a _core built for fuzzing (.ci/run fuzz) calls libFuzzer's
    coverage hooks, which that library then provides (made global here)."""
    import ctypes
    import glob

    import atheris
    target = []

    def first(data):
        if not target:
            for core in glob.glob(os.path.join(os.path.dirname(atheris.__file__), "core_*.so")):
                try:  # the one atheris loaded (NOLOAD: not the other)
                    ctypes.CDLL(core, mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
                except OSError:
                    pass
            import fuzz_core  # this file, as a module
            target.append(fuzz_core.one_input)
        target[0](data)
    atheris.Setup(argv, first)
    atheris.Fuzz()


if __name__ == "__main__" and "--replay" not in sys.argv:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pass
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        _fuzz_with_atheris(sys.argv)
        sys.exit(0)

from offload import _core  # noqa: E402

REFUSALS = (TypeError, ValueError, BufferError, MemoryError, OverflowError)

DTYPES = [np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.uint8,
          np.dtype(">f4"), np.bool_]


class Reader:
    """Fuzzed choices from a byte string (atheris' FuzzedDataProvider, when it is there)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, lo: int, hi: int) -> int:
        return lo + (self.byte() | self.byte() << 8) % (hi - lo + 1)

    def pick(self, items):
        return items[self.byte() % len(items)]

    def flag(self) -> bool:
        return bool(self.byte() & 1)


class Temporaries:
    """A sequence whose items exist only while the caller holds them; may lie about len()."""

    def __init__(self, items, length):
        self.items, self.length = items, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if i >= len(self.items):
            raise IndexError(i)
        return np.array(self.items[i])  # a fresh copy each time: no one else holds it


class SkipsInit(_core.HostBuffer):
    def __init__(self, *args):  # never calls HostBuffer.__init__
        pass


def array(r: Reader, base=None):
    """An array: fresh, a view of ``base`` (overlap), strided, read-only, 0-d..4-d."""
    kind = r.byte() % 8
    if base is not None and kind < 2 and base.size:
        flat = base.reshape(-1)
        start = r.int(0, flat.size - 1)
        n = r.int(0, flat.size - start)
        a = flat[start:start + n]
        cols = r.int(1, 8)
        return a[:n - n % cols].reshape(-1, cols) if n >= cols else a
    ndim = r.int(0, 4)
    shape = tuple(r.int(0, 9) for _ in range(ndim))
    dtype = r.pick(DTYPES)
    values = (np.arange(int(np.prod(shape)), dtype=np.float64) % 7 - 3).astype(dtype)
    if kind == 2 and np.dtype(dtype).str[0] != ">":  # aligned memory of _core's own
        a = np.asarray(_core.HostBuffer(shape, np.dtype(dtype).str))
        a[...] = values.reshape(shape)  # defined contents: the oracles compare them
    else:
        a = values.reshape(shape)
    if kind == 3 and a.ndim:
        a = a[..., ::2] if a.shape[-1] > 1 else a.T
    if kind == 4:
        a.flags.writeable = False
    return a


def operand(r: Reader, base=None):
    """An array most of the time, else something that is not one."""
    choice = r.byte() % 16
    if choice == 0:
        return None
    if choice == 1:
        return r.int(-5, 5)
    if choice == 2:
        return [1.0, 2.0]
    if choice == 3:
        return SkipsInit()
    if choice == 4:
        return memoryview(bytearray(r.int(0, 64)))
    return array(r, base)


def check_gather(r: Reader):
    out = operand(r)
    parts = [array(r, out if isinstance(out, np.ndarray) else None) for _ in range(r.int(0, 4))]
    strict = r.flag()
    wrap = r.byte() % 4
    seq = Temporaries(parts, len(parts) + r.int(0, 3) if wrap == 1 else len(parts)) \
        if wrap < 2 else tuple(parts) if wrap == 2 else parts
    snapshot = [np.array(p) for p in parts]
    try:
        rows = _core.gather(out, seq, strict=strict)
    except REFUSALS:
        return
    if rows < 0:
        assert not strict
        return
    out = np.asarray(memoryview(out))
    if not all(p.size == 0 or not np.shares_memory(p, out) for p in parts):
        return  # parts inside out: the copies overlap, nothing to compare
    want = np.concatenate([p.reshape(p.shape[:1] + out.shape[1:]) for p in snapshot] +
                          [np.zeros((out.shape[0] - rows,) + out.shape[1:], out.dtype)])
    assert rows == sum(p.shape[0] for p in snapshot)
    np.testing.assert_array_equal(out, want.astype(out.dtype))


def check_copy(r: Reader):
    dst = operand(r)
    src = operand(r, dst if isinstance(dst, np.ndarray) else None)
    before = np.array(src, copy=True) if isinstance(src, np.ndarray) else None
    try:
        _core.copy(dst, src)
    except REFUSALS:
        return
    if before is not None and isinstance(dst, np.ndarray) and before.dtype == dst.dtype:
        np.testing.assert_array_equal(np.asarray(dst).reshape(-1), before.reshape(-1))


def _act(r: Reader):
    return r.int(-1, 6), float(r.int(0, 4)) / 4, -float(r.int(0, 4)), float(r.int(0, 4))


def check_kernels(r: Reader):
    which = r.byte() % 4
    x = operand(r)
    base = x if isinstance(x, np.ndarray) else None
    if which == 0:
        w, bias, residual, out = (operand(r, base) for _ in range(4))
        args = (x, w, bias, residual, out) + _act(r)
        snap = [np.array(a) if isinstance(a, np.ndarray) else a for a in args[:4]]
        try:
            _core.dense(*args)
        except REFUSALS:
            return
        x0, w0, b0, r0 = snap
        want = x0.astype(np.float32) @ w0.astype(np.float32)
        if b0 is not None:  # n values, whatever their shape (as the kernel reads them)
            want = want + b0.astype(np.float32).reshape(-1)
        if r0 is not None:
            want = want + r0.astype(np.float32).reshape(want.shape)
        if args[5] == 0:
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    elif which == 1:
        bias, residual = operand(r, base), operand(r, base)
        try:
            _core.epilogue(x, bias, r.int(-1, 2), residual, *_act(r))
        except REFUSALS:
            return
    elif which == 2:
        out = operand(r, base)
        snap = np.array(x) if isinstance(x, np.ndarray) else None
        try:
            _core.softmax(x, out)
        except REFUSALS:
            return
        if snap is not None and snap.size and np.isfinite(snap).all():
            snap = snap.astype(np.float32)  # what the kernel reads (nanobind converts x)
            e = np.exp(snap.astype(np.float64) - snap.max(-1, keepdims=True))
            np.testing.assert_allclose(out.reshape(snap.shape), e / e.sum(-1, keepdims=True),
                                       rtol=1e-4, atol=1e-5)
    else:
        y, bias, residual = operand(r, base), operand(r, base), operand(r, base)
        try:
            _core.conv_epilogue(x, y, bias, residual, *_act(r))
        except REFUSALS:
            return


def check_program(r: Reader):
    program = _core.Program()
    for _ in range(r.int(0, 4)):
        x = operand(r)
        base = x if isinstance(x, np.ndarray) else None
        try:
            if r.flag():
                program.add_softmax(x, operand(r, base))
            else:
                program.add_dense(x, operand(r, base), operand(r, base), operand(r, base),
                                  operand(r, base), *_act(r))
        except REFUSALS:
            pass
        del x, base
    # every array the program was given is now held only by the program (refcounts: no gc)
    junk = [np.full(64, np.nan, np.float32) for _ in range(8)]
    program.run()
    assert len(program) >= 0
    del junk


def check_hostbuffer(r: Reader):
    shape = [r.int(-2, 9) for _ in range(r.int(0, 5))]
    typestr = r.pick(["<f4", "|u1", "<i8", "<f2", "|b1", "<c8", ">f4", "<f3", "", "<V8", "f4"])
    try:
        hb = _core.HostBuffer(shape, typestr) if r.flag() else SkipsInit()
    except REFUSALS:
        return
    for use in range(r.int(1, 4)):
        try:
            if use == 0:
                a = np.asarray(memoryview(hb))
                a[...] = 1
            elif use == 1:
                np.from_dlpack(hb)
            elif use == 2:
                _core.copy(hb, np.zeros(max(0, hb.nbytes), np.uint8))
            else:
                _core.address(hb)
        except REFUSALS:
            pass


def check_misc(r: Reader):
    try:
        a = _core.aligned_empty(r.int(-4, 1 << 14), 1 << r.int(0, 14))
        a[:] = 1
    except REFUSALS:
        pass
    items = [operand(r) for _ in range(r.int(0, 4))]
    assert -1 <= _core.unshared(items) < max(1, len(items))
    try:
        _core.address(operand(r))
    except REFUSALS:
        pass


def check_rnn(r: Reader):
    """_core.rnn on a layer of fuzzed sizes, lengths (some outside [0, T]) and flags, one or
    two operands replaced by a fuzzed one (wrong shape/dtype/layout, or a view of ``out``)."""
    cell, direction = r.int(0, 1), r.int(0, 2)
    d, g = (2 if direction == 2 else 1), (4 if cell == 0 else 3)
    t, b, i, h = r.int(0, 5), r.int(0, 8), r.int(0, 4), r.int(1, 20)
    pad = lambda n: -(-n // 16) * 16  # noqa: E731
    np_ = pad(4 * h) if cell == 0 else pad(2 * h) + pad(h)
    nx = pad(g * h)
    f = lambda *shape: (np.arange(int(np.prod(shape)), dtype=np.float32) % 5 - 2) / 4  # noqa: E731
    out = np.zeros((t + (2 if cell == 0 else 1), d, b, h), np.float32)
    args = [f(t, b, i).reshape(t, b, i), f(d, nx // 16, i, 16).reshape(d, nx // 16, i, 16),
            f(d, np_ // 16, h, 16).reshape(d, np_ // 16, h, 16), f(d, g * h).reshape(d, g * h),
            f(d, g * h).reshape(d, g * h),
            f(d, 3 * h).reshape(d, 3 * h) if cell == 0 and r.flag() else None,
            np.array([r.int(-2, t + 2) for _ in range(b)], np.int32) if r.flag() else None,
            f(d, b, h).reshape(d, b, h) if r.flag() else None,
            f(d, b, h).reshape(d, b, h) if cell == 0 and r.flag() else None, out]
    for _ in range(r.int(0, 2)):
        args[r.int(0, len(args) - 1)] = operand(r, out)
    try:
        _core.rnn(cell, direction, *args, float(r.int(0, 3)) / 2, r.flag(), r.flag(),
                  r.int(-1, 3), r.flag())
    except REFUSALS:
        return
    assert np.isfinite(args[-1]).all() if isinstance(args[-1], np.ndarray) and \
        args[-1].dtype == np.float32 and args[-1] is out else True


def check_rows(r: Reader):
    """gelu / softmax_scaled / layernorm on fuzzed operands (or views of one another); where a
    call is accepted on finite float32 data, its result against NumPy."""
    which = r.byte() % 4
    x = operand(r)
    base = x if isinstance(x, np.ndarray) else None
    out = operand(r, base)
    other = operand(r, base) if r.flag() else None
    if which == 3:  # dense_packed on fuzzed operands (a packed w of 16-column panels, or not)
        w = np.ones((r.int(0, 3), r.int(0, 9), 16 if r.flag() else r.int(0, 17)), np.float32)
        try:
            _core.dense_packed(x, w if r.flag() else operand(r, base), other,
                               operand(r, base) if r.flag() else None, out, r.int(-1, 6), 0.5,
                               -1.0, 1.0)
        except REFUSALS:
            pass
        return
    flag, scale, div = r.flag(), float(r.int(-4, 4)) / 2, r.int(-1, 6)
    x0 = np.array(x) if isinstance(x, np.ndarray) else None
    try:
        if which == 0:
            _core.gelu(x, out, flag)
        elif which == 1:
            _core.softmax_scaled(x, other, scale, div, out)
        else:
            _core.layernorm(x, other if other is not None else operand(r, base), None, 0.125, out)
    except REFUSALS:
        return
    if x0 is None or not x0.size or not np.isfinite(x0).all() or np.shares_memory(x, out) \
            or which == 2 or (which == 1 and other is not None):
        return
    got, x64 = np.asarray(out).reshape(-1), x0.astype(np.float64).reshape(-1)
    if which == 0:
        from math import erf
        e = np.array([erf(v / 2 ** 0.5 if flag else v) for v in x64])
        want = 0.5 * x64 * (1 + e) if flag else e
    else:
        rows = x64.reshape(-1, x0.shape[-1]) * scale
        e = np.exp(rows - rows.max(-1, keepdims=True))
        want = (e / e.sum(-1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def check_index(r: Reader):
    """_core.topk / _core.reduce on x [outer, n, inner] of fuzzed sizes (ties, a NaN), k up to
    n + 1, an unknown reduction, sometimes an operand replaced by a fuzzed one (wrong rank,
    dtype, layout, or a view of ``out``); a result is checked against NumPy."""
    outer, n, inner = r.int(0, 4), r.int(0, 40), r.int(0, 3)
    x = (np.arange(outer * n * inner) * 7 % 5 - 2).astype(np.float32).reshape(outer, n, inner)
    if x.size and r.flag():
        x.reshape(-1)[r.int(0, x.size - 1)] = np.nan
    topk, largest, fn = r.flag(), r.flag(), r.pick(["sum", "mean", "max", "min", "prod"])
    out = (np.full((outer, r.int(0, n + 1), inner), -1, np.int64) if topk
           else np.full((outer, inner), -1, np.float32))
    args = [x, out]
    if r.byte() % 4 == 0:
        args[r.int(0, 1)] = operand(r, out)
    try:
        _core.topk(*args, largest) if topk else _core.reduce(*args, fn)
    except REFUSALS:
        return
    if args[0] is not x or args[1] is not out:
        return
    if topk:
        want = np.argsort(-x if largest else x, axis=1, kind="stable")[:, :out.shape[1]]
        np.testing.assert_array_equal(out, want)
    elif n:
        np.testing.assert_allclose(out, getattr(np, fn)(x.astype(np.float64), axis=1),
                                   rtol=1e-6, atol=1e-6)


def check_copy_view(r: Reader):
    """_core.copy_view between fuzzed operands (any dtype, strides, transposes, read-only,
    views of one another); where it is accepted, out equals the source as NumPy reads it."""
    out = operand(r)
    src = operand(r, out if isinstance(out, np.ndarray) else None)
    if isinstance(src, np.ndarray) and src.ndim > 1 and r.flag():
        src = src.T
    before = np.array(src) if isinstance(src, np.ndarray) else None
    if r.flag():  # binary_view: src op (a second operand, or src again)
        other = operand(r, out if isinstance(out, np.ndarray) else None) if r.flag() else src
        op = r.int(-1, 6)
        snap = np.array(other) if isinstance(other, np.ndarray) else None
        try:
            _core.binary_view(src, other, out, op)
        except REFUSALS:
            return
        ufunc = [np.add, np.subtract, np.multiply, np.divide, np.maximum, np.minimum][op]
        if before is not None and snap is not None:
            np.testing.assert_array_equal(np.asarray(out), ufunc(before, snap))
        return
    try:
        _core.copy_view(src, out)
    except REFUSALS:
        return
    if before is not None:  # (a buffer-protocol source is taken as it is, too)
        np.testing.assert_array_equal(np.asarray(out), before)


def _conv_reference(x, w, b, strides, pads, dil):
    """The convolution by its definition, in float64 (NCHW, groups 1)."""
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]))
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, m, max(oh, 0), max(ow, 0)))
    if oh <= 0 or ow <= 0:
        return y
    for i in range(kh):
        for j in range(kw):
            taps = xp[:, :, i * dil[0]:i * dil[0] + (oh - 1) * strides[0] + 1:strides[0],
                      j * dil[1]:j * dil[1] + (ow - 1) * strides[1] + 1:strides[1]]
            y += np.einsum("nchw,mc->nmhw", taps, w[:, :, i, j])
    return y + b[None, :, None, None]


def check_conv(r: Reader):
    """_core.conv_direct on fuzzed geometry (strides, pads, dilations, a fused 2x2 pool, both
    weight layouts, M across panel boundaries), sometimes an operand replaced by a fuzzed one
    (wrong shape, dtype, layout, or a view of ``out``); where a call is accepted on the operands
    made here, its result against the definition."""
    from offload.drivers import cpu as _cpu
    n, c, h, wd, m = r.int(0, 2), r.int(1, 5), r.int(1, 9), r.int(1, 9), r.int(1, 40)
    kh, kw = r.int(1, 4), r.int(1, 4)
    strides = [1, 1] if r.flag() else [r.int(1, 3), r.int(1, 3)]
    pads = [r.int(0, 3) for _ in range(4)]
    dil = [r.int(1, 2), r.int(1, 2)]
    pool = r.int(0, 2) if r.byte() % 3 == 0 else 0
    lanes = 16 if r.flag() else 8
    x = (np.arange(n * c * h * wd, dtype=np.float32) % 7 - 3).reshape(n, c, h, wd) / 4
    w = (np.arange(m * c * kh * kw, dtype=np.float32) % 5 - 2).reshape(m, c, kh, kw) / 8
    b = np.arange(m, dtype=np.float32) / 16
    ref = _conv_reference(x, w, b, strides, pads, dil)
    oh, ow = ref.shape[2:]
    if pool:
        oh, ow = oh // 2, ow // 2
    out = np.full((n, m, oh, ow), np.nan, np.float32)
    act = r.int(0, 7)
    act = -1 if act == 7 else act  # 6 and -1: unknown codes (an exhausted input reads 0)
    args = [x, _cpu._pack_direct(w, lanes), b, None, out]
    replaced = False
    if r.byte() % 4 == 3:  # (not 0: what an exhausted input reads)
        args[r.int(0, 4)] = operand(r, out)
        replaced = True
    try:
        _core.conv_direct(*args, m, pads, dil, act, 0.25, -1.0, 1.0, pool=pool, strides=strides)
    except REFUSALS:
        return
    if replaced or act not in (0, 1) or not out.size:
        return
    if act == 1:
        ref = np.maximum(ref, 0)
    if pool:
        win = ref[:, :, :2 * oh, :2 * ow].reshape(n, m, oh, 2, ow, 2)
        ref = win.max(axis=(3, 5)) if pool == 1 else win.mean(axis=(3, 5))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def check_dense_chain(r: Reader):
    """dense_chain / DenseChain on a chain of fuzzed widths, activations, block sizes and
    lanes, one or two operands replaced by a fuzzed one (wrong shape/dtype/layout, a view of
    ``out``, a list that lies about its length); where a call is accepted on the arrays built
    here, its result against NumPy. A DenseChain's arrays are dropped before run()."""
    layers = r.int(1, 4)
    dims = [r.int(0, 40) for _ in range(layers + 1)]
    rows = r.int(0, 30)
    pad = lambda n: -(-n // 16) * 16  # noqa: E731
    f = lambda *shape: (np.arange(int(np.prod(shape)), dtype=np.float32) % 5 - 2) / 4  # noqa: E731
    ws = [f(k, n).reshape(k, n) for k, n in zip(dims, dims[1:])]
    wps = []
    for w in ws:
        k, n = w.shape
        cols = np.zeros((k, pad(n)), np.float32)
        cols[:, :n] = w
        wps.append(np.ascontiguousarray(cols.reshape(k, pad(n) // 16, 16).transpose(1, 0, 2)))
    bs = [f(n) if r.flag() else None for n in dims[1:]]
    acts = [(r.int(-1, 6), float(r.int(-2, 2)) / 4, -float(r.int(0, 2)), float(r.int(0, 2)))
            for _ in range(layers)]
    x, out = f(rows, dims[0]).reshape(rows, dims[0]), np.full((rows, dims[-1]), 9.0, np.float32)
    args = [x, list(wps), list(bs), out] + [list(a) for a in zip(*acts)]
    changed = False
    for _ in range(r.int(0, 2)):
        k = r.int(0, len(args) - 1)
        changed = True
        if k in (1, 2) and isinstance(args[k], list) and args[k] and r.flag():  # an item, a lying list
            items = args[k]
            if r.flag():
                items[r.int(0, len(items) - 1)] = operand(r, out)
            else:
                args[k] = Temporaries(items, len(items) + r.int(0, 2))
        else:
            args[k] = operand(r, out)
    block, lanes = r.pick([0, 0, 12, 13, 384, 385, -1]), r.pick([0, 0, 8, 16, 4])
    keep = r.flag()
    try:
        if keep:
            chain = _core.DenseChain(*args, block, lanes)
            del args
            chain.run()
        else:
            _core.dense_chain(*args, block, lanes)
    except REFUSALS:
        return
    if changed:
        return
    v = x.astype(np.float64)
    for w, b, (code, alpha, lo, hi) in zip(ws, bs, acts):
        v = v @ w + (0 if b is None else b)
        v = [v, np.maximum(v, 0), np.where(v >= 0, v, v * alpha), 1 / (1 + np.exp(-v)),
             np.tanh(v), np.clip(v, lo, hi)][code]
    np.testing.assert_allclose(out, v, rtol=1e-4, atol=1e-4)


CHECKS = [check_gather, check_copy, check_kernels, check_program, check_hostbuffer, check_misc,
          check_rnn, check_rows, check_index, check_copy_view, check_conv, check_dense_chain]


def one_input(data: bytes) -> None:
    r = Reader(data)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanobind: "uninitialized instance"
        for _ in range(1 + r.byte() % 3):
            r.pick(CHECKS)(r)


def seeded(count: int, seed: int = 0, size: int = 96):
    """``count`` reproducible random inputs."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.integers(0, 256, int(rng.integers(1, size)), dtype=np.uint8).tobytes()


def main(argv) -> None:
    if "--replay" in argv:  # every file of a corpus once (under the ASan build: .ci/run fuzz)
        folder = argv[argv.index("--replay") + 1]
        names = sorted(os.listdir(folder))
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                one_input(f.read())
        print(f"replayed {len(names)} inputs from {folder}")
        return
    runs = next((int(a.split("=")[1]) for a in argv if a.startswith("-runs=")), 100000)
    print(f"atheris is not installed: {runs} seeded random inputs instead")
    for data in seeded(runs):
        one_input(data)


if __name__ == "__main__":
    main(sys.argv)
