"""Bit-exact NumPy emulation of Xilinx ``ap_fixed<W,I,Q,O>`` / ``ap_ufixed`` arithmetic.

Values are held as their **raw integers** in ``int64`` arrays: a value ``v`` of a type with
``F = W - I`` fractional bits is the integer ``raw = v * 2**F``, sign-extended (``ap_fixed``) or
zero-extended (``ap_ufixed``) to 64 bits. All arithmetic is exact integer arithmetic, so every
product, sum, rounding and overflow is reproduced bit for bit; ``offload.fpga.hls_csim`` checks this
against the HLS kernels in ``kernels/hls/`` compiled with g++ and Xilinx's own ``ap_fixed.h``.

Semantics (as in ``ap_fixed_base.h``; see UG1399 "Arbitrary Precision Data Types"):

Quantisation (``Q``), applied when a value has more fractional bits than the target; ``x`` is the
exact value in target LSBs, ``floor`` the integer part, "half" a remainder of exactly 1/2:

=============== ================================================================
``AP_TRN``      floor (toward -inf); the default
``AP_RND``      floor(x + 1/2): half toward +inf
``AP_RND_ZERO`` nearest; half toward zero
``AP_RND_MIN_INF`` nearest; half toward -inf
``AP_RND_INF``  nearest; half away from zero
``AP_RND_CONV`` nearest; half to even (convergent)
``AP_TRN_ZERO`` truncate toward zero
=============== ================================================================

Overflow (``O``), applied after quantisation when the value is outside the type's range:

=============== ================================================================
``AP_WRAP``     two's complement wrap (keep the low W bits); the default
``AP_SAT``      saturate to the type's min / max
``AP_SAT_ZERO`` overflow gives 0
``AP_SAT_SYM``  saturate symmetrically: signed min is ``-max``, not ``-max - 1`` (W > 1)
=============== ================================================================

``AP_WRAP_SM`` and a non-zero saturation-bit count ``N`` are not implemented (``ValueError``).

Conversions from float go through float64 and are exact (as ``ap_fixed(double)``); non-finite
values raise ``ValueError`` (``ap_fixed`` has no NaN or infinity). Limits of the emulation:
``1 <= W <= 62``; a conversion may shift by at most 62 bits; a product needs
``W_a + W_b <= 63``. These are far beyond the 8..32-bit types of the FPGA kernels.

The layer functions define the arithmetic of the HLS kernels, step by step:

* :func:`dense`: ``acc = acc_t(bias)``; for ``k`` in order: ``acc += acc_t(x[k] * w[o, k])``
  (the product exact, ``W_x + W_w`` bits, converted to ``acc_t`` with its Q and O, then the sum
  -- exact -- converted to ``acc_t`` again, which can only overflow); ``out = out_t(relu ?
  max(acc, 0) : acc)``. ReLU acts on the accumulator *before* the conversion (with ``AP_WRAP``
  the order matters).
* :func:`conv2d`: the same per output pixel, ``k`` running over ``(c_in, kh, kw)`` in that order
  (C order of an OIHW weight); taps that fall into the zero padding are skipped (adding an exact
  zero changes nothing).
* :func:`maxpool2d`: the max of the raw window (exact), converted to ``out_t``.
* :func:`avgpool2d`: ``acc = 0``; ``acc += acc_t(x)`` over the window in (kh, kw) order; the sum
  divided exactly by the window area (a power of two: a shift into a wider type), converted to
  ``out_t``.

Layouts: activations NCHW (``[batch, c, h, w]``) or ``[batch, features]``; dense weights
``[out, in]`` (ONNX Gemm ``transB=1``, PyTorch); conv weights OIHW; raw int64 throughout.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

__all__ = [
    "Q_MODES",
    "O_MODES",
    "FixedType",
    "parse",
    "convert",
    "quantize",
    "to_float",
    "fake_quantize",
    "dense",
    "conv2d",
    "maxpool2d",
    "avgpool2d",
]

Q_MODES = ("AP_TRN", "AP_RND", "AP_TRN_ZERO", "AP_RND_ZERO", "AP_RND_INF", "AP_RND_MIN_INF",
           "AP_RND_CONV")
O_MODES = ("AP_WRAP", "AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM")
_MAX_BITS = 62

_TYPE_RE = re.compile(
    r"^\s*(?:ap_)?(?P<kind>fixed|ufixed|int|uint)\s*<\s*(?P<args>[^<>]*)>\s*$")


def _mode(token: str, allowed: tuple, what: str) -> str:
    t = token.strip().upper()
    if not t.startswith("AP_"):
        t = "AP_" + t  # hls4ml accepts "RND", "SAT", ...
    if t not in allowed:
        raise ValueError(f"unknown {what} mode {token.strip()!r}; expected one of "
                         f"{', '.join(allowed)}")
    return t


@dataclasses.dataclass(frozen=True)
class FixedType:
    """``ap_fixed<width, integer, q, o>`` (``signed=True``) or ``ap_ufixed`` (``signed=False``).

    ``integer`` counts the sign bit for signed types and may be negative or exceed ``width``.
    """

    width: int
    integer: int
    signed: bool = True
    q: str = "AP_TRN"
    o: str = "AP_WRAP"

    def __post_init__(self):
        if not isinstance(self.width, int) or not 1 <= self.width <= _MAX_BITS:
            raise ValueError(f"width must be an int in 1..{_MAX_BITS}, got {self.width!r}")
        if not isinstance(self.integer, int) or abs(self.width - self.integer) > _MAX_BITS:
            raise ValueError(f"integer bits must be an int with |W - I| <= {_MAX_BITS}, "
                             f"got I={self.integer!r} for W={self.width}")
        object.__setattr__(self, "q", _mode(self.q, Q_MODES, "quantisation"))
        object.__setattr__(self, "o", _mode(self.o, O_MODES, "overflow"))

    # -- parsing and printing ------------------------------------------------
    @classmethod
    def parse(cls, text: "str | FixedType") -> "FixedType":
        """``"ap_fixed<16,6>"``, ``"ap_fixed<16,6,AP_RND,AP_SAT>"``, ``"ap_ufixed<8,0>"``,
        ``"ap_int<8>"``, ``"ap_uint<4>"``; hls4ml spellings ``"fixed<16,6,RND,SAT>"`` too.
        A trailing saturation-bit count must be 0."""
        if isinstance(text, FixedType):
            return text
        m = _TYPE_RE.match(str(text))
        if not m:
            raise ValueError(f"not an ap_fixed/ap_ufixed/ap_int/ap_uint type: {text!r}")
        kind = m["kind"]
        args = [a.strip() for a in m["args"].split(",")]
        try:
            if kind in ("int", "uint"):
                if len(args) != 1:
                    raise ValueError
                w = int(args[0])
                return cls(w, w, kind == "int")
            if not 2 <= len(args) <= 5:
                raise ValueError
            w, i = int(args[0]), int(args[1])
        except ValueError:
            raise ValueError(f"malformed type {text!r}: expected ap_{kind}<W,I[,Q[,O[,N]]]>"
                             ) from None
        q = args[2] if len(args) > 2 else "AP_TRN"
        o = args[3] if len(args) > 3 else "AP_WRAP"
        if len(args) > 4 and int(args[4]) != 0:
            raise ValueError(f"saturation bits N={args[4]} in {text!r} are not implemented")
        return cls(w, i, kind == "fixed", q, o)

    def __str__(self) -> str:
        name = "ap_fixed" if self.signed else "ap_ufixed"
        args = [str(self.width), str(self.integer)]
        if self.q != "AP_TRN" or self.o != "AP_WRAP":
            args.append(self.q)
        if self.o != "AP_WRAP":
            args.append(self.o)
        return f"{name}<{','.join(args)}>"

    cpp = property(__str__, doc="The C++ spelling, for ``-DDATA_T=...``.")

    # -- ranges --------------------------------------------------------------
    @property
    def frac(self) -> int:
        """Fractional bits ``F = W - I`` (may be negative)."""
        return self.width - self.integer

    @property
    def raw_min(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def raw_max(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def lsb(self) -> float:
        return float(np.ldexp(1.0, -self.frac))

    @property
    def min(self) -> float:
        return float(np.ldexp(float(self.raw_min), -self.frac))

    @property
    def max(self) -> float:
        return float(np.ldexp(float(self.raw_max), -self.frac))

    @property
    def storage_dtype(self) -> np.dtype:
        """The integer dtype of this type's memory layout in the HLS kernels' ports (and of
        ``sizeof(ap_fixed<W,...>)`` in C-simulation): the smallest of 8/16/32/64 bits holding W,
        signed for ``ap_fixed``, unsigned for ``ap_ufixed``; the value sign/zero-extended."""
        for bits in (8, 16, 32, 64):
            if self.width <= bits:
                return np.dtype(f"{'i' if self.signed else 'u'}{bits // 8}")
        raise AssertionError("unreachable")

    # -- conversions -----------------------------------------------------------
    def quantize(self, x) -> np.ndarray:
        """Float array -> raw int64, exactly as ``ap_fixed<...>(double(x))``."""
        return quantize(x, self)

    def to_float(self, raw) -> np.ndarray:
        """Raw -> float64 (exact for W <= 53)."""
        return to_float(raw, self)

    def from_raw(self, raw) -> np.ndarray:
        """Validate raw integers (any integer dtype) against the range; return int64."""
        r = np.asarray(raw)
        if r.dtype.kind not in "iu":
            raise TypeError(f"raw values of {self} must be integers, got dtype {r.dtype}")
        r = r.astype(np.int64)
        if r.size and (r.min() < self.raw_min or r.max() > self.raw_max):
            raise ValueError(f"raw values outside {self}: [{r.min()}, {r.max()}] not within "
                             f"[{self.raw_min}, {self.raw_max}]")
        return r

    def to_storage(self, raw) -> np.ndarray:
        """Raw int64 -> a C-contiguous array of :attr:`storage_dtype` (the kernel port layout)."""
        return np.ascontiguousarray(self.from_raw(raw).astype(self.storage_dtype))

    def convert(self, raw, src: "FixedType | str") -> np.ndarray:
        """Raw of type ``src`` -> raw of this type (``ap_fixed`` assignment)."""
        return convert(raw, parse(src).frac, self)


def parse(text: "str | FixedType") -> FixedType:
    """Shorthand for :meth:`FixedType.parse`."""
    return FixedType.parse(text)


# ---------------------------------------------------------------------------
# the two primitives: rounding an exact value, and handling overflow
# ---------------------------------------------------------------------------


def _round_increment(q: str, neg, floor_odd, above_half, exactly_half, inexact):
    """The 0/1 added to the floor by quantisation mode ``q`` (as ``quantization_adjust``)."""
    if q == "AP_TRN":
        return np.zeros_like(neg, dtype=bool)
    if q == "AP_RND":
        return above_half | exactly_half
    if q == "AP_RND_ZERO":
        return above_half | (exactly_half & neg)
    if q == "AP_RND_MIN_INF":
        return above_half
    if q == "AP_RND_INF":
        return above_half | (exactly_half & ~neg)
    if q == "AP_RND_CONV":
        return above_half | (exactly_half & floor_odd)
    if q == "AP_TRN_ZERO":
        return neg & inexact
    raise AssertionError(q)


def _overflow(v: np.ndarray, t: FixedType) -> np.ndarray:
    """Exact integer ``v`` (int64, |v| <= 2**62) in LSBs of ``t`` -> a raw value of ``t``."""
    lo, hi = t.raw_min, t.raw_max
    if t.o == "AP_WRAP":
        m = np.int64(1) << np.int64(t.width)
        w = (v - np.int64(lo)) % m + np.int64(lo)  # numpy % is floor-mod: result in [lo, lo+m)
        return w.astype(np.int64)
    if t.o == "AP_SAT":
        return np.clip(v, lo, hi).astype(np.int64)
    if t.o == "AP_SAT_SYM":  # ap_fixed<1,..> has no symmetric range: it keeps its min, -1 LSB
        return np.clip(v, -hi if t.signed and t.width > 1 else lo, hi).astype(np.int64)
    if t.o == "AP_SAT_ZERO":
        return np.where((v < lo) | (v > hi), 0, v).astype(np.int64)
    raise AssertionError(t.o)


def convert(raw, src_frac: int, dst: "FixedType | str") -> np.ndarray:
    """Exact integers ``raw`` with ``src_frac`` fractional bits -> raw values of ``dst``.

    This is ``ap_fixed`` assignment from any fixed-point value: quantise with ``dst.q`` to
    ``dst.frac`` fractional bits, then overflow with ``dst.o``.
    """
    dst = parse(dst)
    r = np.asarray(raw)
    if r.dtype.kind not in "iu":
        raise TypeError(f"raw values must be integers, got dtype {r.dtype}")
    r = r.astype(np.int64)
    s = int(src_frac) - dst.frac
    if abs(s) > _MAX_BITS:
        raise ValueError(f"conversion to {dst} shifts by {s} bits; at most {_MAX_BITS} supported")
    if s > 0:  # drop s fractional bits, rounding per dst.q
        s64 = np.int64(s)
        floor = r >> s64  # arithmetic shift: floor division by 2**s
        rem = r & ((np.int64(1) << s64) - np.int64(1))
        half = np.int64(1) << np.int64(s - 1)
        inc = _round_increment(dst.q, r < 0, (floor & 1) == 1, rem > half, rem == half,
                               rem != 0)
        v = floor + inc.astype(np.int64)
    elif s < 0:  # exact: append -s zero bits, without leaving int64
        k = -s
        if dst.o == "AP_WRAP":
            if k >= dst.width:
                v = np.zeros_like(r)
            else:
                v = (r % (np.int64(1) << np.int64(dst.width - k))) << np.int64(k)
        else:
            lim = np.int64(1) << np.int64(_MAX_BITS - k)  # |v| <= 2**62 keeps out-of-range
            v = np.clip(r, -lim, lim) << np.int64(k)
    else:
        v = r
    return _overflow(v, dst)


def quantize(x, t: "FixedType | str") -> np.ndarray:
    """Float array -> raw int64 of ``t``; exactly ``ap_fixed<...>(double(x))``."""
    t = parse(t)
    xf = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(xf)):
        raise ValueError(f"cannot quantise non-finite values to {t} (ap_fixed has no NaN/inf)")
    scaled = np.ldexp(xf, t.frac)  # exact: a power-of-two scale
    if not np.all(np.isfinite(scaled)):
        raise ValueError(f"values too large to quantise exactly to {t}")
    fl = np.floor(scaled)
    rem = scaled - fl  # exact, in [0, 1)
    big = np.abs(fl) >= 2.0 ** _MAX_BITS
    if np.any(big):  # already integers; reduce without changing the result
        if t.o == "AP_WRAP":
            fl = np.where(big, np.fmod(fl, 2.0 ** t.width), fl)  # fmod is exact
        else:
            fl = np.clip(fl, -(2.0 ** _MAX_BITS), 2.0 ** _MAX_BITS)
    ifl = fl.astype(np.int64)
    inc = _round_increment(t.q, xf < 0, (ifl & 1) == 1, rem > 0.5, rem == 0.5, rem != 0)
    return _overflow(ifl + inc.astype(np.int64), t)


def to_float(raw, t: "FixedType | str") -> np.ndarray:
    """Raw -> float64 value ``raw * 2**-F``."""
    t = parse(t)
    return np.ldexp(np.asarray(raw, dtype=np.int64).astype(np.float64), -t.frac)


def fake_quantize(x, t: "FixedType | str") -> np.ndarray:
    """``float(ap_fixed(x))`` as float64: the value a float takes in type ``t``."""
    t = parse(t)
    return to_float(quantize(x, t), t)


# ---------------------------------------------------------------------------
# layers (the arithmetic of kernels/hls/*.cpp)
# ---------------------------------------------------------------------------


def _check_raw(raw, t: FixedType, what: str) -> np.ndarray:
    try:
        return t.from_raw(raw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


def _product_frac(x_type: FixedType, w_type: FixedType) -> int:
    if x_type.width + w_type.width > 63:
        raise ValueError(f"product of {x_type} and {w_type} needs "
                         f"{x_type.width + w_type.width} bits; at most 63 supported")
    return x_type.frac + w_type.frac


def _acc_sum(acc, p_acc, acc_type: FixedType, axis: int):
    """acc + sum over ``axis`` of already-converted terms, each step overflowing in acc_type.

    With AP_WRAP, wrapping each step equals wrapping the total (arithmetic mod 2**W), so the sum
    is vectorised; the other overflow modes depend on the order and run the steps in order.
    """
    if acc_type.o == "AP_WRAP":
        n = p_acc.shape[axis]
        chunk = 1 << (62 - acc_type.width)  # |acc| + chunk * 2**(W-1) < 2**63: no int64 overflow
        for start in range(0, n, chunk):
            part = np.take(p_acc, range(start, min(n, start + chunk)), axis=axis)
            acc = _overflow(acc + part.sum(axis=axis, dtype=np.int64), acc_type)
        return acc
    for k in range(p_acc.shape[axis]):
        acc = _overflow(acc + np.take(p_acc, k, axis=axis), acc_type)
    return acc


def _finish(acc, acc_type: FixedType, out_type: FixedType, relu: bool):
    if relu:
        acc = np.maximum(acc, 0)
    return convert(acc, acc_type.frac, out_type)


def dense(x_raw, x_type, w_raw, w_type, b_raw, b_type, acc_type, out_type, relu=False):
    """Fully connected layer on raw values: ``x [N, K]``, ``w [M, K]``, ``b [M]`` -> ``[N, M]``.

    ``acc = acc_t(b)``; ``acc += acc_t(x[n, k] * w[m, k])`` for k = 0..K-1;
    ``out = out_t(max(acc, 0) if relu else acc)``. Bias may be ``None`` (zero).
    """
    x_type, w_type, acc_type, out_type = map(parse, (x_type, w_type, acc_type, out_type))
    x = _check_raw(x_raw, x_type, "dense input")
    w = _check_raw(w_raw, w_type, "dense weight")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"dense: expected x [N, K] and w [M, K], got {x.shape} and {w.shape}")
    n, k = x.shape
    m = w.shape[0]
    if b_raw is None:
        acc = np.zeros((n, m), np.int64)
    else:
        b_type = parse(b_type)
        b = _check_raw(b_raw, b_type, "dense bias")
        if b.shape != (m,):
            raise ValueError(f"dense: expected bias [{m}], got {b.shape}")
        acc = np.broadcast_to(convert(b, b_type.frac, acc_type), (n, m)).copy()
    pf = _product_frac(x_type, w_type)
    # products converted to acc_t: [N, M, K], in chunks of events to bound memory
    out = np.empty((n, m), np.int64)
    step = max(1, (1 << 22) // max(1, m * k))
    for s in range(0, n, step):
        p = x[s:s + step, None, :] * w[None, :, :]
        out[s:s + step] = _acc_sum(acc[s:s + step], convert(p, pf, acc_type), acc_type, axis=2)
    return _finish(out, acc_type, out_type, relu)


def _pad_hw(x, ph: int, pw: int):
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x


def conv2d(x_raw, x_type, w_raw, w_type, b_raw, b_type, acc_type, out_type, relu=False,
           pad: int = 0):
    """2-D convolution, stride 1, symmetric zero padding ``pad`` ('same' for a 3x3 is pad=1).

    ``x [N, C, H, W]``, ``w [O, C, KH, KW]``, ``b [O]`` -> ``[N, O, H + 2 pad - KH + 1, ...]``;
    per output pixel ``acc = acc_t(b)``, then ``acc += acc_t(x * w)`` over (c, kh, kw) in C order,
    padding taps skipped; ``out = out_t(max(acc, 0) if relu else acc)``.
    """
    x_type, w_type, acc_type, out_type = map(parse, (x_type, w_type, acc_type, out_type))
    x = _check_raw(x_raw, x_type, "conv2d input")
    w = _check_raw(w_raw, w_type, "conv2d weight")
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: expected x [N, C, H, W] and w [O, C, KH, KW], "
                         f"got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: kernel {kh}x{kw} larger than padded input {h}x{wd} pad {pad}")
    if b_raw is None:
        acc0 = np.zeros((o,), np.int64)
    else:
        b_type = parse(b_type)
        b = _check_raw(b_raw, b_type, "conv2d bias")
        if b.shape != (o,):
            raise ValueError(f"conv2d: expected bias [{o}], got {b.shape}")
        acc0 = convert(b, b_type.frac, acc_type)
    pf = _product_frac(x_type, w_type)
    xp = _pad_hw(x, pad, pad)
    wf = w.reshape(o, c * kh * kw)
    out = np.empty((n, o, ho, wo), np.int64)
    for i in range(n):  # one event at a time bounds memory: [O, HW, K]
        cols = np.lib.stride_tricks.sliding_window_view(xp[i], (kh, kw), axis=(1, 2))
        cols = cols.transpose(1, 2, 0, 3, 4).reshape(ho * wo, c * kh * kw)  # [HW, (c,kh,kw)]
        p = convert(wf[:, None, :] * cols[None, :, :], pf, acc_type)  # [O, HW, K]
        acc = np.broadcast_to(acc0[:, None], (o, ho * wo)).copy()
        out[i] = _acc_sum(acc, p, acc_type, axis=2).reshape(o, ho, wo)
    return _finish(out, acc_type, out_type, relu)


def _windows(x, k: int):
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    if ho < 1 or wo < 1:
        raise ValueError(f"pool: window {k} larger than input {h}x{w}")
    v = x[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k)
    return v.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, k * k)  # window in (kh, kw) order


def maxpool2d(x_raw, x_type, out_type, k: int = 2):
    """k x k max pooling, stride k, no padding (floor): the raw max, converted to ``out_t``."""
    x_type, out_type = parse(x_type), parse(out_type)
    x = _check_raw(x_raw, x_type, "maxpool input")
    if x.ndim != 4:
        raise ValueError(f"maxpool2d: expected x [N, C, H, W], got {x.shape}")
    return convert(_windows(x, k).max(axis=-1), x_type.frac, out_type)


def avgpool2d(x_raw, x_type, acc_type, out_type, k: int = 2):
    """k x k average pooling, stride k, no padding; k*k must be a power of two.

    ``acc = 0; acc += acc_t(x)`` over the window in (kh, kw) order; ``out = out_t(acc / k*k)`` with
    the division exact (``acc`` read with log2(k*k) more fractional bits).
    """
    x_type, acc_type, out_type = map(parse, (x_type, acc_type, out_type))
    x = _check_raw(x_raw, x_type, "avgpool input")
    if x.ndim != 4:
        raise ValueError(f"avgpool2d: expected x [N, C, H, W], got {x.shape}")
    area = k * k
    if area & (area - 1):
        raise ValueError(f"avgpool2d: window area {area} is not a power of two")
    win = convert(_windows(x, k), x_type.frac, acc_type)
    acc = _acc_sum(np.zeros(win.shape[:-1], np.int64), win, acc_type, axis=-1)
    return convert(acc, acc_type.frac + area.bit_length() - 1, out_type)
