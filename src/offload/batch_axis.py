"""Whether a graph computes each sample on its own: where the batch axis goes through every op
(``batch_mixing_node``), so that requests may be merged into one run (the batcher), a large call
split into several runs, and a batch padded to its bucket size."""

from __future__ import annotations

import math

import numpy as np

from . import graph as G
from .plan import HostSplit, resolve


# Where the batch axis goes. batch_mixing_node follows the batch through a graph resolved at an
# odd batch size: every run-time tensor holds it on one axis, as a place (axis, block): along
# ``axis`` sample i owns the ``block`` positions from i * block (block 1: that axis is the batch;
# more: a view flattened the batch with the axes after it, as ParticleNet's neighbour gather
# does). An op with no rule, or whose rule finds no place for the batch, mixes samples.

BATCH_PROBE = 7919  # a prime: no other axis (or product of axes) is likely to be a multiple of it


def batch_mixing_node(graph: G.Graph, sample_shapes: tuple) -> str | None:
    """The first node that mixes samples across the batch axis (axis 0 of every input), or None
    when every op treats each sample on its own, so that requests may be merged into one batch,
    a call split into several runs, or a batch padded to a bucket."""
    probe = BATCH_PROBE
    try:
        resolved = resolve(graph, tuple((probe,) + tuple(s) for s in sample_shapes))
    except HostSplit as split:  # a host step: not merged (its shapes come from the values)
        return f"{split.node.source_op or split.node.op} node {split.node.name!r} (a host step)"
    places = {t.name: (0, 1) for t in graph.inputs}
    indices: dict[str, tuple] = {}  # integer tensors of row indices (see _batch_place)
    made_by = {}
    for node, attrs, operands, out_shape in resolved.entries:
        try:
            place = _batch_place(node, attrs, operands, tuple(out_shape), places, indices,
                                 resolved, probe)
        except Exception:  # noqa: BLE001 - an op these rules do not follow: taken as mixing
            place = None
        if place is None or not (0 <= place[0] < len(out_shape)
                                 and out_shape[place[0]] == probe * place[1]):
            return f"{node.source_op or node.op} node {node.name!r}"
        places[node.outputs[0]] = place
        made_by[node.outputs[0]] = node
    for name in graph.outputs:  # the batcher hands out rows of axis 0 of every output
        if places.get(name, (0, 1)) != (0, 1) or indices.get(name, ("",))[0] == "offset":
            node = made_by[name]
            return f"{node.source_op or node.op} node {node.name!r}"
    return None


def _batch_place(node, attrs, operands, out_shape, places, indices, resolved, probe):
    """The place (axis, block) of the batch in ``node``'s output, given those of its run-time
    operands (constants carry none); None when the node mixes samples. ``indices`` marks
    integer tensors by value: ("local", n) for indices in [0, n) of each sample's own axis (TopK
    and views or slices of it), ("offset", q) for i * q + those (n <= q) in sample i's rows."""
    op, a, rank = node.op, attrs, len(out_shape)
    shapes, values = resolved.shapes, resolved.values
    out = node.outputs[0]

    def shape(name):
        return tuple(shapes[name]) if name in shapes else np.shape(values[name])

    def aligned(names):  # the one place of the batched operands after right-aligned broadcasting
        found = {(places[n][0] + rank - len(shape(n)), places[n][1]) for n in names
                 if n in places}
        return found.pop() if len(found) == 1 else None

    if any(n not in places and n not in values for n in operands):
        return None  # a run-time tensor without a known place
    offset = _row_offset(node, operands, rank, places, indices, values, shape, probe)
    if offset is not None:
        indices[out] = ("offset", offset)
        return aligned(operands)
    if not all(_same_rows(values[n], probe) for n in operands if n not in places):
        return None  # a constant made at the probe batch that differs between samples
    x = operands[0]
    ax, block = places.get(x, (None, 1))
    keeps_values = op in G.VIEW_OPS or op in ("slice", "transpose") or (
        op == "elementwise" and a.get("fn") in ("cast", "copy"))
    if keeps_values and x in indices:
        indices[out] = indices[x]
    elif [n for n in operands if indices.get(n, ("",))[0] == "offset"] not in (
            [], operands[1:2] if op in ("gather", "gather_nd") else []):
        return None  # row offsets are positions in the merged batch: only a gather may read them
    if op in G.VIEW_OPS:  # row-major: the batch stays whole where the axes before it keep
        before, per = math.prod(shape(x)[:ax]), block * math.prod(shape(x)[ax + 1:])
        for j, d in enumerate(out_shape):  # their product and those after it one sample's size
            if d and d % probe == 0 and math.prod(out_shape[:j]) == before and \
                    d // probe * math.prod(out_shape[j + 1:]) == per:
                return j, d // probe
        return None
    if op in ("add", "sub", "mul", "div", "elementwise", "activation"):
        return aligned(operands)
    if op in ("softmax", "layernorm"):  # softmax: along axis; layernorm: over axis and after
        place = aligned(operands)
        axis = a["axis"] % rank
        return place if place and (place[0] < axis if op == "layernorm" else
                                   place[0] != axis) else None
    if op == "concat":
        place = aligned(operands)
        return place if place and place[0] != a["axis"] else None
    if op == "reduce":
        if ax in a["axes"]:
            return None
        return (ax if node.attrs.get("keepdims", 1) else
                ax - sum(i < ax for i in a["axes"]), block)
    if op in ("conv2d", "maxpool", "avgpool", "global_avgpool", "dense"):
        weights, residual = (operands[1:3], operands[3:]) if a.get("residual") else \
            (operands[1:], ())
        if any(n in places for n in weights) or any(places.get(n) != (ax, block)
                                                    for n in residual):
            return None  # run-time weights, or a fused residual added at another place
        if op == "dense":  # rows of x times a weight: any axis but the contracted last one
            return (ax, block) if ax < rank - 1 else None
        return (ax, block) if ax == 0 or (op == "global_avgpool" and ax == 1) else None
    if op in ("topk", "cumsum"):
        if op == "topk":
            indices[out] = ("local", shape(x)[a["axis"]])
        return (ax, block) if ax != a["axis"] else None
    if op == "pad":
        return (ax, block) if not a["begin"][ax] and not a["end"][ax] else None
    if op == "transpose":
        return a["perm"].index(ax), block
    if op == "slice":
        whole = not a["starts"][ax] and a["steps"][ax] == 1 and out_shape[ax] == shape(x)[ax]
        return (ax, block) if whole else None
    if op == "tile":
        return (ax, block) if a["repeats"][ax] == 1 else None
    if op == "matmul":  # A [..., M, K] @ B [..., K, N]: batch dims, M of A and N of B are rows
        (pa, pb), (sa, sb) = (places.get(n) for n in operands[:2]), map(shape, operands[:2])
        batch_dims = rank - (len(sa) > 1) - (len(sb) > 1)
        found = set()
        if pa is not None:
            if pa[0] == len(sa) - 1:
                return None  # contracting over the batch
            found.add((pa[0] + batch_dims - (len(sa) - 2), pa[1]))  # M lands at batch_dims
        if pb is not None:
            if len(sb) == 1 or pb[0] == len(sb) - 2:
                return None
            found.add((rank - 1 if pb[0] == len(sb) - 1 else pb[0] + batch_dims - (len(sb) - 2),
                       pb[1]))
        return found.pop() if len(found) == 1 else None
    if op == "rnn":  # X [T, B, I] (time-major whatever the ONNX layout: onnx_import transposes),
        want = {"x": 1, "seq": 0, "h0": 1, "c0": 1}  # out [T + 1 (+1), D, B, H]
        found = set()
        for role, name in zip(node.attrs["roles"], node.inputs):
            if name in places:
                if want.get(role) != places[name][0]:
                    return None
                found.add(places[name][1])
        return (2, found.pop()) if len(found) == 1 else None
    if op in ("gather", "gather_elements", "gather_nd", "scatter_nd"):
        return _index_place(op, a, operands, places, indices, shape)
    return None


def _index_place(op, a, operands, places, indices, shape):
    """The batch's place after an index op (see _batch_place): data and indices may not both
    carry the batch, except rows of a flattened batch taken at "offset" indices of the same
    block (ParticleNet's neighbours: data [N * P, C], indices arange(N) * P + TopK's)."""
    x, idx = operands[0], operands[1]
    px, pi = places.get(x), places.get(idx)
    offsets = px is not None and pi is not None and indices.get(idx) == ("offset", px[1])
    if indices.get(idx, ("",))[0] == "offset" and not offsets:
        return None
    if op == "gather":  # data[:axis] + indices + data[axis + 1:]
        axis, rank_i = a["axis"], len(shape(idx))
        if px is not None and pi is not None:
            return (axis + pi[0], pi[1]) if offsets and px[0] == axis else None
        if px is not None:
            return None if px[0] == axis else (px[0] + (rank_i - 1 if px[0] > axis else 0), px[1])
        return axis + pi[0], pi[1]
    if op == "gather_elements":  # indices and data of one rank, the output of the indices'
        found = {places[n] for n in operands[:2] if n in places}
        place = found.pop() if len(found) == 1 else None
        return place if place and place[0] != a["axis"] else None
    lead = len(shape(idx)) - 1  # indices [..., q] index the first q axes of the data
    q = shape(idx)[-1]
    if op == "gather_nd":  # out: indices[:-1] + data[q:]
        if px is not None and pi is not None:
            return pi if offsets and px[0] == 0 and q == 1 and pi[0] < lead else None
        if px is not None:
            return None if px[0] < q else (lead + px[0] - q, px[1])
        return pi if pi[0] < lead else None
    if op == "scatter_nd":  # updates [indices[:-1] + data[q:]] written into data
        pu = places.get(operands[2])
        if px is None or pi is not None or px[0] < q or \
                (pu is not None and pu != (lead + px[0] - q, px[1])):
            return None
        return px
    return None


def _row_offset(node, operands, rank, places, indices, values, shape, probe):
    """q when ``node`` adds i * q to "local" indices in [0, n <= q) of each sample i (a
    constant arange(N) * q along their batch axis), else None."""
    if not (node.op == "add" or (node.op == "elementwise" and node.attrs.get("fn") == "add")) \
            or len(operands) != 2:
        return None
    for local, const in (operands, operands[::-1]):
        tag, place = indices.get(local), places.get(local)
        if tag is None or tag[0] != "local" or place is None or place[1] != 1 or \
                const in places:
            continue
        v = np.asarray(values[const])
        dims = (1,) * (rank - v.ndim) + v.shape
        axis = place[0] + rank - len(shape(local))
        if v.dtype.kind not in "iu" or v.size != probe or dims[axis] != probe:
            continue
        flat = v.reshape(-1).astype(np.int64)
        q = int(flat[1] - flat[0])
        if q >= tag[1] and np.array_equal(flat, np.arange(probe, dtype=np.int64) * q):
            return q
    return None


def _same_rows(value, probe) -> bool:
    """Whether a constant is the same for every sample along each axis that is a multiple of
    the probe batch (ConstantOfShape, a class token expanded to the batch: yes; Range: no)."""
    v = np.asarray(value)
    for k, d in enumerate(v.shape):
        if d and d % probe == 0:
            rows = v.reshape(v.shape[:k] + (probe, d // probe) + v.shape[k + 1:])
            if not np.array_equal(rows, np.broadcast_to(rows.take([0], axis=k), rows.shape),
                                  equal_nan=v.dtype.kind in "fc"):
                return False
    return True
