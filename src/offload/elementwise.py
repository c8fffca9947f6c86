"""The table of elementwise expressions: one row per function, read by every device.

Each row gives the expression in C (over the operands ``a``, ``b``, ``c`` and the float
parameters ``p0``, ``p1``) and in NumPy. The OpenCL and CUDA kernels are generated from the C
text through ``kernels/dialect.h`` (``generate``: one kernel per function and operand/result
dtypes, every operand a strided view of rank <= 6, so broadcasting, transposes, slices and
concatenation are elementwise copies); the cpu device evaluates the NumPy column. Adding an
elementwise ONNX op is one row here, its converter line in onnx_import, and its test.

Operands of a float tensor are read as float (whatever the storage precision), integer tensors
as their integer type, bool as int; ``c_int`` is the C text used when no operand is float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _erf(x):
    # Abramowitz & Stegun 7.1.26 in float64: |error| < 1.5e-7 (NumPy has no erf)
    x = np.asarray(x, np.float64)
    s, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 +
                                                                       t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


def _int_mod(a, b):
    return np.mod(a, b) if np.asarray(a).dtype.kind in "iu" else np.fmod(a, b) + \
        np.where((np.fmod(a, b) != 0) & ((np.fmod(a, b) < 0) != (b < 0)), b, 0)


def _errs(fn):
    def run(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    return run


@dataclass(frozen=True)
class Expr:
    arity: int
    c: str                       # C expression, float operands
    numpy: Callable              # (arrays..., p0, p1) -> array
    result: str = "same"         # "same": the dtype of the first (Where: second) operand;
                                 # "bool"; "to": attrs["to"] (Cast)
    c_int: str | None = None     # C expression when every operand is an integer / bool


_NAN_MAX = "((a != a || a > b) ? a : b)"
_NAN_MIN = "((a != a || a < b) ? a : b)"

TABLE: dict[str, Expr] = {
    "copy": Expr(1, "a", lambda a, p0, p1: a),
    "cast": Expr(1, "a", lambda a, p0, p1: a, result="to"),
    "add": Expr(2, "a + b", lambda a, b, p0, p1: a + b),
    "sub": Expr(2, "a - b", lambda a, b, p0, p1: a - b),
    "mul": Expr(2, "a * b", lambda a, b, p0, p1: a * b),
    "div": Expr(2, "a / b", _errs(lambda a, b, p0, p1: a / b if np.asarray(a).dtype.kind == "f"
                                  else np.trunc(a / b))),
    "pow": Expr(2, "pow(a, (float)b)", _errs(lambda a, b, p0, p1: np.power(
        a.astype(np.float64), b).astype(a.dtype))),
    "mod": Expr(2, "(fmod(a, b) != 0 && ((fmod(a, b) < 0) != (b < 0)) ? fmod(a, b) + b : "
                   "fmod(a, b))", _errs(lambda a, b, p0, p1: _int_mod(a, b)),
                c_int="(a % b != 0 && ((a % b < 0) != (b < 0)) ? a % b + b : a % b)"),
    "fmod": Expr(2, "fmod(a, b)", _errs(lambda a, b, p0, p1: np.fmod(a, b)),
                 c_int="(a % b)"),
    "max": Expr(2, _NAN_MAX, lambda a, b, p0, p1: np.maximum(a, b)),
    "min": Expr(2, _NAN_MIN, lambda a, b, p0, p1: np.minimum(a, b)),
    "equal": Expr(2, "a == b", lambda a, b, p0, p1: a == b, "bool"),
    "less": Expr(2, "a < b", lambda a, b, p0, p1: a < b, "bool"),
    "greater": Expr(2, "a > b", lambda a, b, p0, p1: a > b, "bool"),
    "less_equal": Expr(2, "a <= b", lambda a, b, p0, p1: a <= b, "bool"),
    "greater_equal": Expr(2, "a >= b", lambda a, b, p0, p1: a >= b, "bool"),
    "and": Expr(2, "(a != 0) && (b != 0)", lambda a, b, p0, p1: np.logical_and(a, b), "bool"),
    "or": Expr(2, "(a != 0) || (b != 0)", lambda a, b, p0, p1: np.logical_or(a, b), "bool"),
    "xor": Expr(2, "(a != 0) != (b != 0)", lambda a, b, p0, p1: np.logical_xor(a, b), "bool"),
    "not": Expr(1, "a == 0", lambda a, p0, p1: np.logical_not(a), "bool"),
    "where": Expr(3, "(a != 0) ? b : c", lambda a, b, c, p0, p1: np.where(a, b, c)),
    "neg": Expr(1, "-a", lambda a, p0, p1: -a),
    "abs": Expr(1, "fabs(a)", lambda a, p0, p1: np.abs(a), c_int="(a < 0 ? -a : a)"),
    "sign": Expr(1, "(float)((a > 0) - (a < 0))", lambda a, p0, p1: np.sign(a),
                 c_int="((a > 0) - (a < 0))"),
    "reciprocal": Expr(1, "1.0f / a", _errs(lambda a, p0, p1: 1 / a)),
    "sqrt": Expr(1, "sqrt(a)", _errs(lambda a, p0, p1: np.sqrt(a))),
    "exp": Expr(1, "exp(a)", _errs(lambda a, p0, p1: np.exp(a))),
    "log": Expr(1, "log(a)", _errs(lambda a, p0, p1: np.log(a))),
    "floor": Expr(1, "floor(a)", lambda a, p0, p1: np.floor(a)),
    "ceil": Expr(1, "ceil(a)", lambda a, p0, p1: np.ceil(a)),
    "round": Expr(1, "rint(a)", lambda a, p0, p1: np.round(a)),
    "atan": Expr(1, "atan(a)", lambda a, p0, p1: np.arctan(a)),
    "sin": Expr(1, "sin(a)", lambda a, p0, p1: np.sin(a)),
    "cos": Expr(1, "cos(a)", lambda a, p0, p1: np.cos(a)),
    "tanh": Expr(1, "tanh(a)", lambda a, p0, p1: np.tanh(a)),
    "sigmoid": Expr(1, "1.0f / (1.0f + exp(-a))", _errs(lambda a, p0, p1: 1 / (1 + np.exp(-a)))),
    "relu": Expr(1, "(a < 0 ? 0 : a)", lambda a, p0, p1: np.maximum(a, 0)),
    "erf": Expr(1, "erf(a)", lambda a, p0, p1: _erf(a)),
    "gelu": Expr(1, "0.5f * a * (1.0f + erf(a * 0.70710678118654752f))",
                 lambda a, p0, p1: 0.5 * a * (1 + _erf(a * 0.7071067811865476))),
    "gelu_tanh": Expr(1, "0.5f * a * (1.0f + tanh(0.7978845608028654f * (a + 0.044715f * a * a * a)))",
                      lambda a, p0, p1: 0.5 * a * (1 + np.tanh(0.7978845608028654 *
                                                               (a + 0.044715 * a ** 3)))),
    "elu": Expr(1, "(a < 0 ? p0 * (exp(a) - 1.0f) : a)",
                _errs(lambda a, p0, p1: np.where(a < 0, p0 * (np.exp(a) - 1), a))),
    "leaky_relu": Expr(1, "(a < 0 ? p0 * a : a)", lambda a, p0, p1: np.where(a < 0, p0 * a, a)),
    "prelu": Expr(2, "(a < 0 ? b * a : a)", lambda a, b, p0, p1: np.where(a < 0, b * a, a)),
    "softplus": Expr(1, "(a > 20.0f ? a : log(1.0f + exp(a)))",
                     _errs(lambda a, p0, p1: np.logaddexp(0, a.astype(np.float64)))),
    "hard_sigmoid": Expr(1, "fmax(0.0f, fmin(1.0f, p0 * a + p1))",
                         lambda a, p0, p1: np.clip(p0 * a + p1, 0, 1)),
    "clip": Expr(3, "((a < b ? b : a) > c ? c : (a < b ? b : a))",
                 lambda a, b, c, p0, p1: np.minimum(np.maximum(a, b), c)),
    "muladd": Expr(3, "a * b + c", lambda a, b, c, p0, p1: a * b + c),
    "is_nan": Expr(1, "a != a", lambda a, p0, p1: np.isnan(a), "bool"),
}

_KINDS = {"f": "f", "d": "f", "e": "f", "i": "i", "u": "i", "b": "b"}
_CODE = {np.dtype(np.float32): "f", np.dtype(np.float16): "f", np.dtype(np.uint16): "f",
         np.dtype(np.int64): "l", np.dtype(np.int32): "i", np.dtype(np.bool_): "b",
         np.dtype(np.uint8): "b"}
_CTYPE = {"l": "i64", "i": "int", "b": "u8"}


def params(attrs: dict) -> tuple:
    """The float parameters p0, p1 a node passes to its expression."""
    return tuple(float(v) for v in attrs.get("params", ()))


def result_dtype(fn: str, dtypes: list, attrs: dict) -> np.dtype:
    """The dtype of ``fn``'s result for operands of ``dtypes``."""
    rule = TABLE[fn].result
    if rule == "bool":
        return np.dtype(np.bool_)
    if rule == "to":
        return np.dtype(attrs["to"])
    return np.dtype(dtypes[1] if fn == "where" else dtypes[0])


def evaluate(fn: str, arrays: list, attrs: dict) -> np.ndarray:
    """The NumPy column: ``fn`` on ``arrays`` (broadcast), in the result dtype."""
    p = list(params(attrs)) + [0.0, 0.0]
    res = TABLE[fn].numpy(*arrays, np.float32(p[0]), np.float32(p[1]))
    out = result_dtype(fn, [np.asarray(a).dtype for a in arrays], attrs)
    if fn == "cast" and out == np.bool_:
        return np.asarray(arrays[0]) != 0
    return np.asarray(res).astype(out, copy=False)


def code(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CODE:
        raise TypeError(f"no device type for dtype {dtype.name}")
    return _CODE[dtype]


def generate(fn: str, in_dtypes: list, out_dtype, defines=None) -> tuple[str, str]:
    """(kernel name, source) of the generated kernel for ``fn`` on these dtypes. Float tensors
    are ``real`` (the plan's storage precision, see dialect.h); the source includes dialect.h
    expanded, so it builds on its own."""
    from .drivers._kernels import kernel_source
    row = TABLE[fn]
    codes = [code(d) for d in in_dtypes]
    out = code(out_dtype)
    name = f"ew_{fn}_{''.join(codes)}_{out}"
    names = "abc"[:row.arity]
    any_float = any(c == "f" for c in (codes[1:] if fn == "where" else codes))
    expr = row.c if any_float or row.c_int is None else row.c_int
    if not any_float and fn in ("sqrt", "exp", "log", "erf", "pow"):
        expr = row.c
    idx = "int r = i, c_, iy = yb" + "".join(f", i{n} = {n}b" for n in names) + ";"
    steps = []
    for k in range(5, -1, -1):
        upd = f"iy += c_ * y{k};" + "".join(f" i{n} += c_ * {n}{k};" for n in names)
        steps.append(f"    c_ = r % d{k}; r /= d{k}; {upd}")
    loads = []
    for n, c in zip(names, codes):
        if c == "f":
            loads.append(f"    float {n} = LD({n.upper()}, i{n});")
        elif c == "l":
            loads.append(f"    i64 {n} = {n.upper()}[i{n}];")
        else:
            loads.append(f"    int {n} = (int){n.upper()}[i{n}];")
    if out == "f":
        store = f"    ST(Y, iy, (float)({expr}));"
    elif out == "b":
        store = f"    Y[iy] = (u8)(({expr}) != 0);"
    else:
        store = f"    Y[iy] = ({_CTYPE[out]})({expr});"
    strides = lambda p: ", ".join(f"int {p}{k}" for k in range(6))  # noqa: E731
    ytype = "real" if out == "f" else _CTYPE[out]
    params_ = [f"GLOBAL {ytype}* RESTRICT Y, int yb, {strides('y')}"]
    for n, c in zip(names, codes):
        t = "real" if c == "f" else _CTYPE[c]
        params_.append(f"GLOBAL const {t}* RESTRICT {n.upper()}, int {n}b, {strides(n)}")
    params_.append(f"int n, {strides('d')}, float p0, float p1")
    body = "\n".join([
        f"KERNEL void {name}({', '.join(params_)})", "{",
        "    int i = GID(0);", "    if (i >= n) return;", "    " + idx, *steps, *loads, store,
        "}"])
    return name, kernel_source("dialect.h") + "\n#line 1 \"" + name + "\"\n" + body + "\n"
