"""Every IR op's attributes checked against its operands, and sizes checked before allocating.

The one place that decides whether a node is well formed, as onnxruntime's kernels do when they
are created: ``check_node`` runs each node's rule from ``RULES`` at load (``passes.validate``,
with ONNX shape inference's shapes, where free axes are names and unknown axes None) and again
on concrete shapes whenever a node is evaluated (constant folding at load and at plan time) or
planned. A rule raises ``ModelFormatError`` (an attribute that disagrees with an operand, an
attribute outside what ONNX allows) or ``ShapeError`` (operands whose shapes do not fit each
other), naming the node, the attribute and both sizes. Device drivers may then trust what they
get: a conv's kernel is its weight's, its channels divide by its groups, a pool's pads are
smaller than its window.

Adding an op is one function here: ``@rule("my_op")`` on ``def _my_op(c: Node check)``; use
``c.dims(i)`` / ``c.value(i)`` for operand ``i``'s shape (None where unknown) and constant value,
``c.fail(...)`` / ``c.shape_fail(...)`` to refuse. An op without a rule is only checked for
its generic properties (its attribute types and output count).

Deliberately stricter than onnxruntime (which runs these): a non-finite Gemm alpha or beta, a
BatchNormalization epsilon below 0 or NaN, auto_pad together with explicit pads (which the ONNX
spec forbids), an unreadable initializer even when no node reads it, shape-like operands (axes,
pads, target shapes) of rank above 1.

Memory: ``memory_limit()`` is the most bytes one load or one plan may ask for
(``offload.load(..., memory_limit=...)``, else the environment variable
``OFFLOAD_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix), else half of the machine's physical
memory); ``check_bytes`` raises ``DeviceMemoryError`` naming what asked for more.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager

import numpy as np

from .errors import (DeviceMemoryError, ModelFormatError, OffloadError, ShapeError,
                     UnsupportedOpError)

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
RULES: dict = {}


def rule(*ops):
    """Register a check for IR ops ``ops`` (see the module docstring)."""
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# memory limit

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value, what: str = "memory_limit") -> int:
    """A byte count from an int or a string such as ``"8G"``, ``"512M"``, ``"1000000"``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number of bytes, got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, float) and math.isfinite(value):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value.upper())
        if not m:
            raise ValueError(f"{what}: expected bytes such as 8G, 512M or 1000000, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    else:
        raise ValueError(f"{what}: expected a number of bytes, got {value!r}")
    if n <= 0:
        raise ValueError(f"{what}: expected a positive number of bytes, got {value!r}")
    return n


def default_memory_limit() -> int:
    """``OFFLOAD_MEMORY_LIMIT`` if set, else half of the physical memory."""
    env = os.environ.get("OFFLOAD_MEMORY_LIMIT")
    if env:
        return parse_bytes(env, "OFFLOAD_MEMORY_LIMIT")
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        limit = 8 << 30
    try:  # a process whose address space is capped (ulimit -v) gets half of that
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            limit = min(limit, soft // 2)
    except (ImportError, ValueError, OSError):
        pass
    return limit


def memory_limit(limit=None) -> int:
    """``limit`` parsed, or the default (see the module docstring)."""
    return default_memory_limit() if limit is None else parse_bytes(limit)


def check_bytes(nbytes: int, limit: int, what: str) -> None:
    """Refuse (DeviceMemoryError) before allocating ``nbytes`` for ``what`` over ``limit``."""
    if nbytes > limit:
        raise DeviceMemoryError(f"{what} needs {_size(nbytes)}, over the memory limit of "
                                f"{_size(limit)} (offload.load(..., memory_limit=...) or "
                                "OFFLOAD_MEMORY_LIMIT)")


def _size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0]]
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------------
# the check of one node

class Check:
    """What a rule sees of one node: its attributes, its operands' shapes and constant values."""

    def __init__(self, node, shapes, values):
        self.node, self.attrs = node, node.attrs
        self.shapes, self.values = list(shapes), list(values)
        self.label = f"{node.source_op or node.op} node {node.name!r}"

    def has(self, i) -> bool:
        return len(self.node.inputs) > i and bool(self.node.inputs[i])

    def dims(self, i):
        """Operand i's shape (ints, names for free axes, None per unknown axis), or None."""
        if not self.has(i):
            return None
        v = self.value(i)
        if v is not None:
            return tuple(v.shape)
        s = self.shapes[i] if i < len(self.shapes) else None
        return None if s is None else tuple(s)

    def value(self, i):
        v = self.values[i] if i < len(self.values) and self.has(i) else None
        return None if v is None else np.asarray(v)

    def ints(self, i, what, scalar=False):
        """Operand i's constant value as a list of ints (None when not constant); a 1-D
        tensor, or also a scalar where ``scalar`` (as onnxruntime takes them)."""
        v = self.value(i)
        if v is None:
            return None
        if v.dtype.kind not in "iub":
            self.fail(f"{what} must be integers, got {v.dtype}")
        if v.ndim != 1 and not (scalar and v.ndim == 0):
            self.fail(f"{what} must be a 1-D tensor, got shape {list(v.shape)}")
        return [int(x) for x in v.reshape(-1)]

    def fail(self, why):
        raise ModelFormatError(f"{self.label}: {why}")

    def shape_fail(self, why):
        raise ShapeError(f"{self.label}: {why}")

    def attr_ints(self, key, length=None, minimum=None, default=None):
        """Attribute ``key`` as a tuple of ints, checked for length and lower bound."""
        value = self.attrs.get(key, default)
        if value is None:
            return None
        if isinstance(value, np.ndarray):
            value = tuple(value.reshape(-1).tolist())
        if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
            self.fail(f"attribute {key} must be a list of ints, got {value!r}")
        value = tuple(int(v) for v in value)
        if length is not None and len(value) != length:
            self.fail(f"attribute {key} has {len(value)} values, expected {length}: {list(value)}")
        if minimum is not None and any(v < minimum for v in value):
            self.fail(f"attribute {key} must be >= {minimum}, got {list(value)}")
        return value

    def attr_int(self, key, default=None):
        value = self.attrs.get(key, default)
        if value is None:
            return None
        if not _is_int(value):
            self.fail(f"attribute {key} must be an int, got {value!r}")
        return int(value)

    def axis(self, axis, rank, what="axis"):
        if rank is not None and not -rank <= axis < rank:
            self.fail(f"{what} {axis} is out of range for rank {rank}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _known(d) -> bool:
    return isinstance(d, (int, np.integer))


def _elements(shape) -> int | None:
    if shape is None or not all(_known(d) for d in shape):
        return None
    return math.prod(int(d) for d in shape)


def check_node(node, shapes, values) -> None:
    """Check ``node`` with its operands' shapes and constant values (lists parallel to
    ``node.inputs``; None where unknown). Raises ModelFormatError or ShapeError."""
    if not node.outputs or not node.outputs[0]:
        raise ModelFormatError(f"{node.source_op or node.op} node {node.name!r} has no output")
    c = Check(node, shapes, values)
    for s in c.shapes:
        if s is not None and any(_known(d) and d < 0 for d in s):
            c.fail(f"an operand has a negative dimension: {list(s)}")
    fn = RULES.get(node.op)
    if fn is not None:
        fn(c)


@contextmanager
def guard(node, what="evaluating"):
    """Anything but an OffloadError raised inside becomes a ModelFormatError naming ``node``: the
    last line behind the rules, for what they do not foresee (NumPy's errors on odd operands)."""
    try:
        yield
    except OffloadError:
        raise
    except MemoryError:
        raise DeviceMemoryError(f"{node.source_op or node.op} node {node.name!r}: out of host "
                                f"memory while {what}") from None
    except Exception as e:
        raise ModelFormatError(f"{node.source_op or node.op} node {node.name!r}: failed while "
                               f"{what} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


def output_bytes(node, shapes, values) -> int | None:
    """An upper estimate of the bytes a host evaluation of ``node`` produces, for the ops whose
    output can be far larger than their inputs (None where not estimated: the others' outputs
    are bounded by their inputs, or checked when planned)."""
    c = Check(node, shapes, values)
    op = node.op
    if op == "constant_of_shape":
        dims = c.ints(0, "the shape")
        return None if dims is None else math.prod(max(d, 0) for d in dims) * 8
    if op == "range":
        try:
            start, limit, delta = (float(c.value(i).reshape(-1)[0]) for i in range(3))
        except (TypeError, IndexError, ValueError, AttributeError):
            return None
        if not all(math.isfinite(v) for v in (start, limit, delta)):
            c.fail(f"start {start}, limit {limit} and delta {delta} must be finite")
        if delta == 0:
            c.fail("delta is 0")
        return max(0, math.ceil((limit - start) / delta)) * 8
    if op == "pad":
        from .graph import pad_amounts
        x = c.dims(0)
        if _elements(x) is None:
            return None
        begin, end = pad_amounts(node, len(x), c.value(1), c.value(3))
        return math.prod(max(int(d) + b + e, 0) for d, b, e in zip(x, begin, end)) * 8
    if op == "concat":
        sizes = [_elements(c.dims(i)) for i in range(len(node.inputs))]
        return None if None in sizes else sum(sizes) * 8
    return None


def evaluate(node, inputs: list, limit: int) -> list:
    """``reference.evaluate`` of a node on constants (folding at load or at plan time), after its
    rule and a size estimate against ``limit``; any failure is a typed error naming the node."""
    from . import reference
    shapes = [None if v is None else np.shape(v) for v in inputs]
    with guard(node, "folding it"):
        check_node(node, shapes, inputs)
        nbytes = output_bytes(node, shapes, inputs)
        if nbytes is not None:
            check_bytes(nbytes, limit, f"{node.source_op or node.op} node {node.name!r}")
        return reference.evaluate(node, inputs)


# ---------------------------------------------------------------------------------------------
# the rules

def _window(c, weight_kernel=None):
    """Kernel, strides, pads, dilations and auto_pad of a conv or pool, checked."""
    a = c.attrs
    kernel = c.attr_ints("kernel", minimum=1)
    if kernel is None:
        kernel = weight_kernel
    if kernel is None:
        c.fail("attribute kernel_shape is missing")
    if len(kernel) != 2:
        c.fail(f"a {len(kernel)}-D window {list(kernel)} (only 2-D windows are supported)")
    c.attr_ints("strides", length=2, minimum=1)
    c.attr_ints("dilations", length=2, minimum=1)
    pads = c.attr_ints("pads", length=4, minimum=0)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        c.fail(f"attribute auto_pad is {auto_pad!r}; ONNX allows {', '.join(AUTO_PADS)}")
    if auto_pad != "NOTSET" and pads is not None and any(pads):
        c.fail(f"attribute auto_pad {auto_pad!r} together with explicit pads {list(pads)}")
    return tuple(kernel), pads


@rule("conv2d")
def _conv(c):
    x, w = c.dims(0), c.dims(1)
    groups = c.attr_int("groups", 1)
    if groups < 1:
        c.fail(f"attribute group is {groups}; it must be >= 1")
    if w is not None and len(w) in (3, 5) and (x is None or len(x) == len(w)):
        # a valid ONNX Conv over 1 or 3 spatial axes that the importer did not lower to 2-D
        if len(w) == 3:  # onnx_import lowers 1-D Convs whose weight or kernel_shape it sees
            raise UnsupportedOpError(f"Conv node {c.node.name!r}: a 1-D Conv (weight {list(w)}) "
                                     "without kernel_shape whose weight is not an initializer: "
                                     "weights and bias must be constants of a convolution",
                                     [("Conv", c.node.name)])
        raise UnsupportedOpError(f"Conv node {c.node.name!r}: {len(w) - 2}-D Conv (weight "
                                 f"{list(w)}); offload runs 2-D windows here",
                                 [("Conv", c.node.name)])
    if w is not None and len(w) != 4:
        c.fail(f"the weight has shape {list(w)}; a 2-D convolution needs a 4-D weight "
               "[M, C/group, kH, kW]")
    if w is not None and _elements(w) == 0:
        c.fail(f"the weight has shape {list(w)}, with no elements")
    kernel, _ = _window(c, tuple(w[2:]) if w is not None else None)
    if w is not None and all(_known(d) for d in w[2:]) and tuple(w[2:]) != kernel:
        c.fail(f"attribute kernel_shape {list(kernel)} disagrees with the weight's spatial "
               f"shape {list(w[2:])} (weight {list(w)})")
    if x is not None and len(x) != 4:
        c.shape_fail(f"expected a 4-D [N, C, H, W] input, got shape {list(x)}")
    if w is not None and _known(w[0]) and w[0] % groups:
        c.fail(f"the weight's {w[0]} output channels (M) do not divide by group {groups}")
    if x is not None and _known(x[1]) and x[1] % groups:
        c.shape_fail(f"the input's {x[1]} channels (C) do not divide by group {groups}")
    if x is not None and w is not None and _known(x[1]) and _known(w[1]) \
            and x[1] != w[1] * groups:
        c.shape_fail(f"the input has {x[1]} channels; the weight {list(w)} with group {groups} "
                     f"expects {w[1] * groups}")
    b = c.dims(2)
    if b is not None and w is not None and (len(b) != 1 or (_known(b[0]) and _known(w[0])
                                                            and b[0] != w[0])):
        c.fail(f"the bias has shape {list(b)}; expected [{w[0]}] (one per output channel)")
    _window_fits(c, x, kernel)


def _window_fits(c, x, kernel):
    """The (padded) input must hold at least one window."""
    if x is None or len(x) != 4 or not all(_known(d) for d in x[2:]):
        return
    a = c.attrs
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return
    pads = tuple(a.get("pads") or (0, 0, 0, 0)) if a.get("auto_pad", "NOTSET") == "NOTSET" \
        else (0, 0, 0, 0)
    dil = tuple(a.get("dilations") or (1, 1))
    for i in range(2):
        span = dil[i] * (kernel[i] - 1) + 1
        if x[2 + i] + pads[i] + pads[i + 2] < span:
            c.shape_fail(f"input {list(x)} (padded by {list(pads)}) is smaller than the window "
                         f"{list(kernel)} (dilations {list(dil)})")


@rule("maxpool", "avgpool")
def _pool(c):
    kernel, pads = _window(c)
    x = c.dims(0)
    if x is not None and len(x) != 4:
        c.shape_fail(f"expected a 4-D [N, C, H, W] input, got shape {list(x)}")
    if pads is not None and any(p >= kernel[i % 2] for i, p in enumerate(pads)):
        c.fail(f"attribute pads {list(pads)} must be smaller than kernel_shape {list(kernel)} "
               "(as onnxruntime requires)")
    if c.attr_int("ceil_mode", 0) not in (0, 1):
        c.fail(f"attribute ceil_mode must be 0 or 1, got {c.attrs.get('ceil_mode')!r}")
    _window_fits(c, x, kernel)


@rule("global_avgpool")
def _global_pool(c):
    x = c.dims(0)
    if x is not None and len(x) < 3:
        c.shape_fail(f"expected an input [N, C, spatial...], got shape {list(x)}")


def _rank2(c, i, what):
    s = c.dims(i)
    if s is not None and len(s) != 2:
        c.shape_fail(f"{what} must be 2-D, got shape {list(s)}")
    return s


@rule("gemm")
def _gemm(c):
    a, b = _rank2(c, 0, "A"), _rank2(c, 1, "B")
    ta, tb = c.attr_int("transA", 0), c.attr_int("transB", 0)
    for name, value in (("alpha", c.attrs.get("alpha", 1.0)), ("beta", c.attrs.get("beta", 1.0))):
        if not isinstance(value, (float, int, np.floating)) or isinstance(value, bool) or \
                not math.isfinite(value):
            c.fail(f"attribute {name} must be a finite float, got {value!r}")
    if b is not None and _elements(b) == 0:
        c.fail(f"B has shape {list(b)}, with no elements")
    if a is None or b is None:
        return
    k_a = a[0] if ta else a[1]
    k_b, n = (b[1], b[0]) if tb else (b[0], b[1])
    if _known(k_a) and _known(k_b) and k_a != k_b:
        c.shape_fail(f"inner sizes differ: A {list(a)} (transA={ta}) has K={k_a}, B {list(b)} "
                     f"(transB={tb}) has K={k_b}")
    m = a[1] if ta else a[0]
    cs = c.dims(2)
    if cs is not None:  # C broadcasts to [M, N], one way (as onnxruntime)
        target = (m, n)
        ok = len(cs) <= 2 and all(not _known(d) or not _known(t) or d in (1, t)
                                  for d, t in zip(cs[::-1], target[::-1]))
        if not ok:
            c.shape_fail(f"C of shape {list(cs)} does not broadcast to [M, N] = {[m, n]}")


@rule("matmul", "dense")
def _matmul(c):
    a, b = c.dims(0), c.dims(1)
    if b is not None and _elements(b) == 0:
        c.fail(f"the second operand has shape {list(b)}, with no elements")
    if a is None or b is None or not a or not b:
        if (a is not None and not a) or (b is not None and not b):
            c.shape_fail("MatMul operands must have rank >= 1")
        return
    k_a, k_b = a[-1], (b[-2] if len(b) >= 2 else b[0])
    if _known(k_a) and _known(k_b) and k_a != k_b:
        c.shape_fail(f"inner sizes differ: {list(a)} has {k_a} columns, {list(b)} has {k_b} rows")


@rule("batchnorm")
def _batchnorm(c):
    x = c.dims(0)
    if x is not None and len(x) < 2:
        c.shape_fail(f"expected an input [N, C, ...], got shape {list(x)}")
    channels = x[1] if x is not None and len(x) >= 2 else None
    eps = c.attrs.get("epsilon", 1e-5)
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not eps >= 0:
        c.fail(f"attribute epsilon must be a float >= 0, got {eps!r}")
    for i, name in enumerate(("scale", "B", "mean", "var"), start=1):
        s = c.dims(i)
        if s is None:
            continue
        if len(s) != 1 or (_known(channels) and _known(s[0]) and s[0] != channels):
            c.fail(f"{name} has shape {list(s)}; expected [{channels}] (one per channel of input "
                   f"{list(x) if x is not None else '?'})")


@rule("reshape")
def _reshape(c):
    target = c.ints(1, "the target shape")
    if target is None:
        return
    if any(t < -1 for t in target):
        c.fail(f"target shape {target} has a value below -1")
    if target.count(-1) > 1:
        c.fail(f"target shape {target} has more than one -1")
    allowzero = c.attr_int("allowzero", 0)
    if allowzero and 0 in target and -1 in target:
        c.fail(f"target shape {target} has both 0 and -1 with allowzero=1")
    x = c.dims(0)
    if x is None:
        return
    if not allowzero and any(t == 0 and i >= len(x) for i, t in enumerate(target)):
        c.shape_fail(f"target shape {target} copies an axis (0) beyond the input's rank "
                     f"{len(x)}")
    size = _elements(x)
    if size is None:
        return
    out = [x[i] if t == 0 and not allowzero else t for i, t in enumerate(target)]
    known = math.prod(d for d in out if d != -1)
    if (-1 in out and (known == 0 or size % known)) or (-1 not in out and known != size):
        c.shape_fail(f"cannot reshape input {list(x)} ({size} elements) to {target}")


@rule("flatten")
def _flatten(c):
    x = c.dims(0)
    axis = c.attr_int("axis", 1)
    if x is not None and not -len(x) <= axis <= len(x):
        c.fail(f"axis {axis} is out of range [-{len(x)}, {len(x)}] for rank {len(x)}")


@rule("concat")
def _concat(c):
    axis = c.attr_int("axis")
    if axis is None:
        c.fail("attribute axis is missing")
    shapes = [c.dims(i) for i in range(len(c.node.inputs))]
    known = [s for s in shapes if s is not None]
    if not known:
        return
    rank = len(known[0])
    if any(len(s) != rank for s in known):
        c.shape_fail(f"inputs have different ranks: {[list(s) for s in known]}")
    c.axis(axis, rank)
    axis %= max(rank, 1)
    for i in range(rank):
        if i == axis:
            continue
        sizes = {s[i] for s in known if _known(s[i])}
        if len(sizes) > 1:
            c.shape_fail(f"inputs {[list(s) for s in known]} differ on axis {i}, outside the "
                         f"concat axis {axis}")


@rule("transpose")
def _transpose(c):
    perm = c.attr_ints("perm")
    x = c.dims(0)
    if perm is not None and (sorted(perm) != list(range(len(perm))) or
                             (x is not None and len(perm) != len(x))):
        c.fail(f"attribute perm {list(perm)} is not a permutation of the input's "
               f"{len(x) if x is not None else len(perm)} axes")


@rule("softmax")
def _softmax(c):
    x = c.dims(0)
    axis = c.attr_int("axis", -1)
    if x is not None:
        c.axis(axis, len(x))


@rule("reduce")
def _reduce(c):
    x = c.dims(0)
    axes = c.attr_ints("axes")
    if axes is None:
        axes = c.ints(1, "axes", scalar=True)
    if axes is not None and x is not None and x:
        for a in axes:
            c.axis(a, len(x), "axis")
        if len({a % len(x) for a in axes}) != len(axes):
            c.fail(f"axes {axes} repeat an axis")


@rule("squeeze", "unsqueeze")
def _squeeze(c):
    x = c.dims(0)
    axes = c.attr_ints("axes")
    if axes is None:
        axes = c.ints(1, "axes", scalar=True)
    if axes is None or x is None:
        return
    rank = len(x) + (len(axes) if c.node.op == "unsqueeze" else 0)
    if not rank:
        if axes:
            c.fail(f"axes {axes} for a scalar input")
        return
    for a in axes:
        c.axis(a, rank)
    if len({a % rank for a in axes}) != len(axes):
        c.fail(f"axes {axes} repeat an axis")
    if c.node.op == "squeeze":
        for a in axes:
            if _known(x[a % rank]) and x[a % rank] != 1:
                c.shape_fail(f"axis {a} of input {list(x)} has size {x[a % rank]}, not 1")


@rule("gather")
def _gather(c):
    x = c.dims(0)
    axis = c.attr_int("axis", 0)
    if x is None:
        return
    if not x:
        c.shape_fail("cannot gather from a scalar")
    c.axis(axis, len(x))
    idx = c.value(1)
    size = x[axis % len(x)]
    if idx is not None:
        if idx.dtype.kind not in "iu":
            c.fail(f"indices must be integers, got {idx.dtype}")
        if _known(size) and idx.size and (idx.min() < -size or idx.max() >= size):
            c.fail(f"indices {idx.reshape(-1)[:8].tolist()} out of range for axis {axis} of "
                   f"size {size} (input {list(x)})")


@rule("pad")
def _pad(c):
    x = c.dims(0)
    pads = c.attr_ints("pads")
    if pads is None:
        pads = c.ints(1, "pads")
    axes = c.ints(3, "axes") if c.has(3) else None
    if pads is None or x is None:
        return
    rank = len(x)
    n_axes = len(axes) if axes is not None else rank
    if axes is not None:
        for a in axes:
            c.axis(a, rank)
    if len(pads) != 2 * n_axes:
        c.fail(f"pads {pads} has {len(pads)} values; expected {2 * n_axes} for "
               f"{'axes ' + str(axes) if axes is not None else 'input ' + str(list(x))}")
    which = [a % rank for a in axes] if axes is not None else list(range(rank))
    for k, a in enumerate(which):
        grown = x[a] + pads[k] + pads[k + n_axes] if _known(x[a]) else None
        if grown is not None and grown < 0:
            c.shape_fail(f"pads {pads} crop axis {a} of input {list(x)} below size 0")
    v = c.value(2)
    if v is not None and v.size != 1:  # as onnxruntime
        c.fail(f"the constant value must be one element, got shape {list(v.shape)}")


@rule("slice")
def _slice(c):
    starts, ends = c.ints(1, "starts"), c.ints(2, "ends")
    axes = c.ints(3, "axes") if c.has(3) else None
    steps = c.ints(4, "steps") if c.has(4) else None
    x = c.dims(0)
    if starts is None or ends is None:
        return
    n = len(starts)
    for name, v in (("ends", ends), ("axes", axes), ("steps", steps)):
        if v is not None and len(v) != n:
            c.fail(f"{name} {v} and starts {starts} differ in length")
    if steps is not None and 0 in steps:
        c.fail(f"steps {steps} contain 0")
    if x is not None:
        for a in axes if axes is not None else range(n):
            c.axis(a, len(x))
        if axes is not None and len({a % len(x) for a in axes}) != len(axes):
            c.fail(f"axes {axes} repeat an axis")
        if axes is None and n > len(x):
            c.fail(f"{n} starts for an input of rank {len(x)}")


@rule("cast")
def _cast(c):
    from .reference import ONNX_DTYPES
    to = c.node.attrs.get("to")
    if isinstance(to, str):  # the IR's cast carries the NumPy name the importer mapped it to
        if to not in {np.dtype(d).name for d in ONNX_DTYPES.values()}:
            c.fail(f"attribute to={to!r} is not a dtype offload runs")
        return
    to = c.attr_int("to")
    if to not in ONNX_DTYPES:
        c.fail(f"attribute to={to} is not a supported ONNX element type "
               f"(supported: {sorted(ONNX_DTYPES)})")


@rule("constant_of_shape")
def _constant_of_shape(c):
    dims = c.ints(0, "the shape")
    if dims is not None and any(d < 0 for d in dims):
        c.fail(f"the shape {dims} has a negative dimension")
    v = c.attrs.get("value")
    if v is not None and (not isinstance(v, np.ndarray) or v.size != 1):
        c.fail("attribute value must be a one-element tensor")


@rule("range")
def _range(c):
    for i, name in enumerate(("start", "limit", "delta")):
        v = c.value(i)
        if v is not None and v.size != 1:
            c.fail(f"{name} must be a scalar, got shape {list(v.shape)}")
    v = c.value(2)
    if v is not None and v.size == 1 and float(v.reshape(-1)[0]) == 0:
        c.fail("delta is 0")


@rule("add", "sub", "mul", "div")
def _binary(c):
    a, b = c.dims(0), c.dims(1)
    if a is not None and b is not None:
        try:
            np.broadcast_shapes(tuple(d if _known(d) else 1 for d in a),
                                tuple(d if _known(d) else 1 for d in b))
        except ValueError:
            c.shape_fail(f"shapes {list(a)} and {list(b)} do not broadcast")
    if c.node.op == "div":
        d = c.value(1)
        x = c.value(0)
        integer = (d is not None and d.dtype.kind in "iub") or \
            (x is not None and x.dtype.kind in "iub")
        if d is not None and integer and d.size and not np.all(d):
            c.fail("integer division by zero (a constant divisor holds 0)")


@rule("activation")
def _activation(c):
    from .graph import ACTIVATIONS
    fn = c.attrs.get("fn")
    if fn not in ACTIVATIONS:
        c.fail(f"unknown activation {fn!r}")
    for key in ("alpha", "lo", "hi"):
        v = c.attrs.get(key)
        if v is not None and (not isinstance(v, (int, float, np.floating)) or isinstance(v, bool)):
            c.fail(f"attribute {key} must be a float, got {v!r}")


@rule("clip")
def _clip(c):
    for i, name in ((1, "min"), (2, "max")):
        v = c.value(i)
        if v is not None and v.size != 1:  # onnxruntime also takes one element of shape [1]
            c.fail(f"{name} must be a scalar, got shape {list(v.shape)}")


@rule("shape")
def _shape(c):
    c.attr_int("start", 0)
    c.attr_int("end", 0)


# ---------------------------------------------------------------------------------------------
# recurrent layers (the rnn IR op: LSTM/GRU, see graph.rnn_dims)

RNN_DIRECTIONS = ("forward", "reverse", "bidirectional")


def _dims_fit(got, want) -> bool:
    return len(got) == len(want) and all(
        not (_known(g) and _known(w)) or int(g) == int(w) for g, w in zip(got, want))


@rule("rnn")
def _rnn(c):
    from .graph import RNN_GATES
    a = c.attrs
    if a.get("cell") not in RNN_GATES:
        c.fail(f"unknown cell {a.get('cell')!r}")
    if a.get("direction") not in RNN_DIRECTIONS:
        c.fail(f"attribute direction is {a.get('direction')!r}; ONNX allows "
               f"{', '.join(RNN_DIRECTIONS)}")
    if a.get("layout", 0) not in (0, 1):
        c.fail(f"attribute layout is {a.get('layout')!r}; ONNX allows 0 and 1")
    clip = a.get("clip", 0.0)
    if not (isinstance(clip, float) and math.isfinite(clip) and clip >= 0):
        c.fail(f"attribute clip must be a finite threshold >= 0, got {clip!r}")
    for key in ("input_forget", "linear_before_reset"):
        if a.get(key, 0) not in (0, 1):
            c.fail(f"attribute {key} must be 0 or 1, got {a.get(key)!r}")
    roles = tuple(a.get("roles", ()))
    for role, name in (("x", "X"), ("w", "W"), ("r", "R")):
        if role not in roles:
            c.fail(f"input {name} is missing")
    index = {role: k for k, role in enumerate(roles)}
    dims = {role: c.dims(k) for role, k in index.items()}
    names = {"x": "X", "w": "W", "r": "R", "b": "B", "seq": "sequence_lens", "h0": "initial_h",
             "c0": "initial_c", "p": "P"}
    for role, rank in (("x", 3), ("w", 3), ("r", 3), ("b", 2), ("seq", 1), ("h0", 3),
                       ("c0", 3), ("p", 2)):
        s = dims.get(role)
        if s is not None and len(s) != rank:
            c.shape_fail(f"input {names[role]} must have rank {rank}, got shape {list(s)}")
    g = RNN_GATES[a["cell"]]
    d = 2 if a["direction"] == "bidirectional" else 1
    r, x = dims["r"], dims["x"]
    h = a.get("hidden")
    if h is not None and (not _is_int(h) or h <= 0):
        c.fail(f"attribute hidden_size must be a positive int, got {h!r}")
    if h is None:
        h = r[2] if r is not None and _known(r[2]) else None
    t = x[0] if x is not None else None
    batch = x[1] if x is not None else None
    inputs = x[2] if x is not None else None
    want = {"w": (d, g * h if h else None, inputs), "r": (d, g * h if h else None, h),
            "b": (d, 2 * g * h if h else None), "seq": (batch,), "h0": (d, batch, h),
            "c0": (d, batch, h), "p": (d, 3 * h if h else None)}
    for role in ("w", "r", "b", "p", "h0", "c0", "seq"):
        s = dims.get(role)
        if s is None:
            continue
        if not _dims_fit(s, want[role]):
            shown = ["?" if v is None else v for v in want[role]]
            c.fail(f"input {names[role]} has shape {list(s)}, expected {shown} for "
                   f"hidden_size {h}, {d} direction(s) ({a['direction']}), {g} gates and X "
                   f"{list(x) if x is not None else '?'}")
    if "p" in roles and a["cell"] != "lstm":
        c.fail("peephole weights P on a GRU")
    lens = c.value(index["seq"]) if "seq" in index else None
    if lens is not None:
        check_sequence_lens(c.label, lens, t)


def check_sequence_lens(label: str, lens, t) -> None:
    """ShapeError naming the node when a sequence length is negative or longer than the time
    axis (T); run-time lengths are checked with this before the layer runs."""
    lens = np.asarray(lens).reshape(-1)
    if lens.dtype.kind not in "iu":
        raise ModelFormatError(f"{label}: sequence_lens must be integers, got {lens.dtype}")
    if lens.size and int(lens.min()) < 0:
        raise ShapeError(f"{label}: sequence_lens has a negative length {int(lens.min())} "
                         f"(batch entry {int(lens.argmin())})")
    if lens.size and _known(t) and int(lens.max()) > int(t):
        raise ShapeError(f"{label}: sequence_lens has length {int(lens.max())} (batch entry "
                         f"{int(lens.argmax())}) but the time axis of X has {int(t)} steps")


# ---------------------------------------------------------------------------------------------
# ONNX-level: attribute types against the op's schema (before any converter reads them)

def onnx_outputs(graph, label: str) -> None:
    """Graph outputs must declare an element type offload knows (onnxruntime refuses a model
    whose output type is undefined)."""
    from .reference import ONNX_DTYPES
    if not graph.output:
        raise ModelFormatError(f"{label}: the graph has no outputs")
    for v in graph.value_info:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == 0:
            raise ModelFormatError(f"{label}: tensor {v.name!r} has an undefined element type")
    for v in graph.output:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or t.elem_type not in ONNX_DTYPES:
            raise ModelFormatError(f"{label}: graph output {v.name!r} has element type "
                                   f"{t.elem_type} (undefined or not supported)")


def onnx_attributes(node, opset: int, label: str, name: str) -> None:
    """Each attribute of ONNX ``node`` has the type its schema says (an int where ints are
    expected, ...), before any converter reads it; unknown ops are left to the importer."""
    import onnx
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # unknown op or domain: reported as unsupported by the importer
        return
    for attr in node.attribute:
        spec = schema.attributes.get(attr.name)
        if spec is None:
            continue
        expected = int(spec.type)
        if attr.type != expected:
            got = onnx.AttributeProto.AttributeType.Name(attr.type) if attr.type in \
                onnx.AttributeProto.AttributeType.values() else f"type {attr.type}"
            raise ModelFormatError(
                f"{label}: {node.op_type} node {name!r}: attribute {attr.name} is "
                f"{got}, expected {onnx.AttributeProto.AttributeType.Name(expected)}")


def index_message(op, node, value, where, axis, size) -> str:
    """The message of an index outside its axis, on every device: ``where`` is the index's
    position in the indices tensor."""
    at = f" at position {tuple(int(w) for w in where)} of the indices" if len(where) else ""
    return (f"{op} node {node!r}: index {value}{at} is outside [-{size}, {size - 1}] for axis "
            f"{axis} (size {size}) of its data")


def first_bad_index(idx: np.ndarray, sizes) -> int | None:
    """The flat position of the first index outside [-size, size) (``sizes`` broadcast over
    idx), or None."""
    bad = (idx < -sizes) | (idx >= sizes)
    if not bad.any():
        return None
    return int(np.flatnonzero(bad)[0])
