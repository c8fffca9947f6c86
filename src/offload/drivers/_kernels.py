"""What the drivers built on the shared kernel sources (OpenCL, CUDA) have in common: the
sources themselves, the codes their kernels take, the GEMM shapes, and the helpers their op
builders use to lay out arguments. Not a driver (its name starts with "_")."""

from __future__ import annotations

import math
import re

import numpy as np

from .._resources import KERNEL_DIR
from ..errors import UnsupportedOpError

PROGRAMS = ("elementwise.cl", "gemm.cl", "conv.cl", "pool.cl", "reduce.cl", "index.cl", "rnn.cl")
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "clip": 5}
BINARY_OPS = {"add": 0, "sub": 1, "mul": 2, "div": 3}
REDUCTIONS = {"sum": 0, "mean": 1, "max": 2, "min": 3, "prod": 4}
MAX_RANK = 6

# GEMM shapes (gemm.cl macros; TM x TN is the block of C per work-group, WM x WN per work-item).
# CPUs run gemm_direct (DIRECT): no local memory nor barrier, 6 x 32 register blocks that become
# AVX-512 vectors (PoCL: ~150-180 GFLOP/s at 512^3 on 2 Zen 5 cores, against 5-35 for gemm_tiled);
# GPUs run gemm_tiled: 64 x 64 local-memory tiles, work-item-strided 4 x 4 blocks (coalesced).
GEMM_CPU = dict(TM=48, TN=32, WM=6, WN=32, DIRECT=1)
GEMM_GPU = dict(TM=64, TN=64, TK=16, WM=4, WN=4)

i32 = np.int32
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def kernel_source(name: str, _seen=None) -> str:
    """The source of kernels/<name> with its quoted includes expanded once each, ``#line``
    markers keeping file names and line numbers for compiler messages."""
    seen = set() if _seen is None else _seen
    out = [f'#line 1 "{name}"']
    for number, line in enumerate((KERNEL_DIR / name).read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            if m.group(1) not in seen:
                seen.add(m.group(1))
                out.append(kernel_source(m.group(1), seen))
            out.append(f'#line {number + 1} "{name}"')
        else:
            out.append(line)
    return "\n".join(out)


def _sequence(*fns):
    """One callable running ``fns`` in order (None entries skipped); the cpu driver uses it too."""
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return lambda: None
    if len(fns) == 1:
        return fns[0]

    def run():
        for f in fns:
            f()
    return run


def _operand(ctx, x):
    """A device buffer for an operand: run-time buffers as they are, constants uploaded once."""
    if isinstance(x, np.ndarray):
        return ctx.weight(x)
    return x


def _window_args(attrs, x, out):
    _, _, h, w = x.shape
    _, _, oh, ow = out.shape
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel"], attrs["strides"], attrs["dilations"]
    pt, pl, pb, pr = attrs["pads"]
    return (i32(h), i32(w), i32(kh), i32(kw), i32(oh), i32(ow), i32(sh), i32(sw), i32(pt),
            i32(pl), i32(dh), i32(dw)), (pb, pr)


def _contiguous_strides(shape):
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return strides[::-1]


def _collapse(dims, *stride_lists):
    """Merge adjacent axes that every operand walks contiguously (to fit MAX_RANK)."""
    out_d, out_s = [], [[] for _ in stride_lists]
    for i, d in enumerate(dims):
        if d == 1:
            continue
        if out_d and all(s[i] * d == o[-1] for s, o in zip(stride_lists, out_s)) and \
                all(o[-1] != 0 or s[i] == 0 for s, o in zip(stride_lists, out_s)):
            out_d[-1] *= d
            for s, o in zip(stride_lists, out_s):
                o[-1] = s[i]
            continue
        out_d.append(d)
        for s, o in zip(stride_lists, out_s):
            o.append(s[i])
    return out_d, out_s


def _pad_rank(dims, *stride_lists, fill=0):
    if len(dims) > MAX_RANK:
        raise UnsupportedOpError(f"opencl: rank {len(dims)} exceeds the kernels' {MAX_RANK}",
                                 [("broadcast", "")])
    extra = MAX_RANK - len(dims)
    return ([1] * extra + list(dims),) + tuple([fill] * extra + list(s) for s in stride_lists)


def _broadcast_strides(out_shape, a_shape, b_shape):
    rank = len(out_shape)
    lists = []
    for shape in (a_shape, b_shape):
        shape = (1,) * (rank - len(shape)) + tuple(shape)
        strides = _contiguous_strides(shape)
        lists.append([0 if d == 1 and o != 1 else s for d, o, s in zip(shape, out_shape,
                                                                          strides)])
    dims, (sa, sb) = _collapse(list(out_shape), *lists)
    return _pad_rank(dims, sa, sb)


def _outer_r_inner(shape, axes):
    """[outer, R, inner] for contiguous reduced ``axes``."""
    lo, hi = axes[0], axes[-1] + 1
    return math.prod(shape[:lo]), math.prod(shape[lo:hi]), math.prod(shape[hi:])


class MatmulPlan:
    """A batched product C[..] = A[..] @ B[..] with broadcast batch axes, as one batched GEMM
    over two batch levels: z = zo * inner + zi, each operand's start moving by zo * s_o +
    zi * s_i elements (stride 0 on a broadcast axis): ``batch`` (outer, inner) and
    ``strides`` (sa, sb, sc), each an (s_o, s_i) pair."""

    def __init__(self, a_shape, b_shape, out_shape):
        a_shape, b_shape = tuple(a_shape), tuple(b_shape)
        if len(a_shape) == 1:
            a_shape = (1,) + a_shape
        if len(b_shape) == 1:
            b_shape = b_shape + (1,)
        self.m, self.k = a_shape[-2:]
        self.n = b_shape[-1]
        batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
        sa = _batch_strides(a_shape, batch, self.m * self.k)
        sb = _batch_strides(b_shape, batch, self.k * self.n)
        sc = _contiguous_strides(batch)
        sc = [s * self.m * self.n for s in sc]
        dims, (sa, sb, sc) = _collapse(list(batch), sa, sb, sc)
        if len(dims) > 2:
            raise UnsupportedOpError(f"MatMul of {list(a_shape)} and {list(b_shape)}: the batch "
                                     f"axes broadcast in {len(dims)} separate groups; at most 2 "
                                     "are supported", [("MatMul", "")])
        dims = [1] * (2 - len(dims)) + dims
        pad = lambda s: [0] * (2 - len(s)) + s  # noqa: E731
        self.batch = tuple(dims)
        self.strides = (tuple(pad(sa)), tuple(pad(sb)), tuple(pad(sc)))


def _batch_strides(shape, batch, matrix):
    lead = (1,) * (len(batch) - (len(shape) - 2)) + tuple(shape[:-2])
    strides = [s * matrix for s in _contiguous_strides(lead)]
    return [0 if d == 1 and o != 1 else s for d, o, s in zip(lead, batch, strides)]


def matmul_plan(a_shape, b_shape, out_shape) -> MatmulPlan:
    return MatmulPlan(a_shape, b_shape, out_shape)
