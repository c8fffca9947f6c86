"""Plan-time rewrites of a resolved graph (plan.resolve's entries: node, attrs, data operands,
out shape), once every shape is known: what only concrete shapes allow (an Expand that the
consumer's broadcasting makes unnecessary) and fusions whose operands must be checked against
shapes and constants (attention's scaled, biased softmax; the written-out GELU)."""

from __future__ import annotations

import math

import numpy as np

from . import graph as G


def fuse(entries, shapes, values, outputs, device_ops):
    """Every rewrite in order, then the entries nothing reads are dropped."""
    entries = _elide_expands(entries, shapes, device_ops)
    entries = _fuse_softmax_inputs(entries, shapes, values, outputs, device_ops)
    entries = _fuse_gelu(entries, shapes, values, outputs, device_ops)
    entries = _fuse_conv_pool(entries, outputs, device_ops)
    entries = _fuse_dense_chain(entries, shapes, outputs, device_ops)
    return _live_entries(entries, outputs)


_BROADCASTING = ("add", "sub", "mul", "div")  # (and elementwise rows)


def _broadcast_source(node, attrs, operands, shapes):
    """The input that an Expand, or a Tile repeating only size-1 axes, copies to a larger shape
    by broadcasting; else None."""
    if not operands or operands[0] not in shapes:
        return None
    if node.op == "elementwise" and "shape" in node.attrs:
        return operands[0]
    if node.op == "tile" and all(r == 1 or d == 1 for r, d in
                                 zip(attrs.get("repeats", ()), shapes[operands[0]])):
        return operands[0]
    return None


def _elide_expands(entries, shapes, device_ops):
    """An Expand (an elementwise copy to a larger shape; also a Tile of size-1 axes) read by
    elementwise ops that would broadcast its input to the same output shape anyway is read
    through: the consumer takes the Expand's input (the copy is dropped by _live_entries when
    nothing else reads it). So is one read by a concat whose builder broadcasts its inputs
    (build_concat.broadcasts: ParticleNet's tiled centre features), along another axis."""
    expanded = {node.outputs[0]: src for node, attrs, operands, _ in entries
                if (src := _broadcast_source(node, attrs, operands, shapes)) is not None}
    if not expanded:
        return entries
    concat_broadcasts = device_ops is not None and \
        getattr(device_ops.get("concat"), "broadcasts", False)
    out = []
    for node, attrs, operands, out_shape in entries:
        elementwise = (node.op == "elementwise" and "shape" not in node.attrs) or \
            node.op in _BROADCASTING
        if elementwise or (node.op == "concat" and concat_broadcasts):
            ops = list(operands)
            for k, name in enumerate(ops):
                src = expanded.get(name)
                if src is None or src not in shapes or name not in shapes:
                    continue
                if elementwise:
                    trial = [shapes[n] for j, n in enumerate(ops) if j != k] + [shapes[src]]
                    want = tuple(out_shape)
                else:  # the part of the concat: the input's own shape, its concat axis kept
                    trial, want = [shapes[src], shapes[name]], tuple(shapes[name])
                    axis = attrs["axis"] % len(want)
                    if len(shapes[src]) != len(want) or shapes[src][axis] != want[axis]:
                        continue
                try:
                    same = tuple(np.broadcast_shapes(*trial)) == want
                except ValueError:
                    same = False
                if same:
                    ops[k] = src
            if ops != list(operands):
                node = G.Node(node.op, ops, node.outputs, node.attrs, node.name, node.source_op)
                operands = ops
        out.append((node, attrs, operands, out_shape))
    return out


def _fuse_softmax_inputs(entries, shapes, values, outputs, device_ops):
    """softmax(x * s + bias) (attention: scores scaled by a constant, plus a mask or pair
    bias) as one softmax step with ``scale`` and a ``bias`` operand, on the last axis, when
    the scaled and biased tensors are read by nothing else."""
    if device_ops is None or not getattr(device_ops.get("softmax"), "scale_bias", False):
        return entries  # (a softmax builder that takes them says so: build_softmax.scale_bias)
    readers, by_out = _readers_and_producers(entries)
    drop, out = set(), list(entries)

    def single(name):
        return readers.get(name, 0) == 1 and name not in outputs and name in by_out

    for k, (node, attrs, operands, out_shape) in enumerate(entries):
        if node.op != "softmax" or attrs["axis"] != len(out_shape) - 1 or "scale" in attrs:
            continue
        u = operands[0]
        if not single(u):
            continue
        a_node, _, a_ops, a_shape = entries[by_out[u]]
        if not (_is_fn(a_node, "add") and len(a_ops) == 2 and tuple(a_shape) == tuple(out_shape)):
            continue
        for t, bias in ((a_ops[0], a_ops[1]), (a_ops[1], a_ops[0])):
            if t not in by_out or not single(t) or bias not in shapes:
                continue
            s_node, _, s_ops, s_shape = entries[by_out[t]]
            if not ((_is_fn(s_node, "mul") or _is_fn(s_node, "div")) and len(s_ops) == 2
                    and tuple(s_shape) == tuple(out_shape)):
                continue
            x, c = s_ops
            cv = values.get(c) if c not in shapes else None
            if cv is None or np.size(cv) != 1 or x not in shapes or \
                    tuple(shapes[x]) != tuple(out_shape):
                continue
            c = float(np.asarray(cv).reshape(-1)[0])
            scale = 1.0 / c if _is_fn(s_node, "div") else c
            fused = dict(attrs, scale=scale, bias=True)
            out[k] = (node, fused, [x, bias], out_shape)
            drop.update((by_out[t], by_out[u]))
            break
    return [e for j, e in enumerate(out) if j not in drop]


def _fuse_gelu(entries, shapes, values, outputs, device_ops):
    """The written-out GELU of PyTorch's exports, x * (erf(x / sqrt 2) + 1) * 0.5 (Div, Erf,
    Add, Mul, Mul; any operand order), as one elementwise gelu step."""
    if device_ops is None or "elementwise" not in device_ops:
        return entries
    readers, by_out = _readers_and_producers(entries)

    def inner(name):  # the entry producing ``name`` when only one step reads it
        if readers.get(name, 0) != 1 or name in outputs or name not in by_out:
            return None
        return entries[by_out[name]]

    def const(name, want):
        v = values.get(name) if name not in shapes else None
        return v is not None and np.size(v) == 1 and \
            abs(float(np.asarray(v).reshape(-1)[0]) - want) <= 1e-6 * abs(want)

    def split(entry, fn, want):  # (the run-time operand, ok) of entry = fn(operand, want)
        node, _, ops, _ = entry
        if not _is_fn(node, fn) or len(ops) != 2:
            return None
        for a, b in ((ops[0], ops[1]), (ops[1], ops[0])):
            if const(b, want) and (fn != "div" or b == ops[1]):
                return a
        return None

    drop, out = set(), list(entries)
    for k, entry in enumerate(entries):
        node, attrs, ops, shape = entry
        m = split(entry, "mul", 0.5)
        e_mul = inner(m) if m else None
        if e_mul is None or not _is_fn(e_mul[0], "mul") or len(e_mul[2]) != 2:
            continue
        for x, a in ((e_mul[2][0], e_mul[2][1]), (e_mul[2][1], e_mul[2][0])):
            e_add = inner(a)
            e = split(e_add, "add", 1.0) if e_add else None
            e_erf = inner(e) if e else None
            if e_erf is None or not _is_fn(e_erf[0], "erf"):
                continue
            e_div = inner(e_erf[2][0])
            y = split(e_div, "div", math.sqrt(2.0)) if e_div else None
            if y is None:
                e_div2 = e_div
                y = split(e_div2, "mul", 1 / math.sqrt(2.0)) if e_div2 else None
            if y != x or x not in shapes or tuple(shapes[x]) != tuple(shape):
                continue
            gelu = G.Node("elementwise", [x], node.outputs, {"fn": "gelu"}, node.name,
                          "Gelu")
            out[k] = (gelu, {"fn": "gelu", "params": (), "node": node.name}, [x], shape)
            drop.update(by_out[n] for n in (m, a, e, e_erf[2][0]))
            break
    return [e for j, e in enumerate(out) if j not in drop]


def _is_fn(node, fn):
    return node.op == fn or (node.op == "elementwise" and node.attrs.get("fn") == fn)


def _fuse_conv_pool(entries, outputs, device_ops):
    """A convolution read only by a 2x2 stride-2 max or average pool without padding (the
    jet-image CNNs' conv, ReLU, pool) as one conv step that writes the pooled output (attrs
    ``pool``: "maxpool" or "avgpool"), on a device whose conv builder takes it
    (build_conv2d.fused_pool): the full-size output is never written and read back."""
    if device_ops is None or not getattr(device_ops.get("conv2d"), "fused_pool", False):
        return entries
    readers, by_out = _readers_and_producers(entries)
    out, drop = list(entries), set()
    for k, (node, attrs, operands, out_shape) in enumerate(entries):
        src = operands[0] if operands else None
        if node.op not in ("maxpool", "avgpool") or src not in by_out or src in outputs \
                or readers.get(src) != 1:
            continue
        c = by_out[src]
        c_node, c_attrs, c_ops, c_shape = out[c]
        n, m, h, w = c_shape
        if (c_node.op != "conv2d" or "pool" in c_attrs or len(c_ops) > 3  # (a residual)
                or "fixed" in c_attrs or "fixed" in attrs  # (fixed point: quant's own layers)
                or tuple(attrs["kernel"]) != (2, 2) or tuple(attrs["strides"]) != (2, 2)
                or tuple(attrs["dilations"]) != (1, 1) or any(attrs["pads"])
                or tuple(out_shape) != (n, m, h // 2, w // 2)):
            continue
        fused = G.Node(c_node.op, c_node.inputs, node.outputs, c_node.attrs, c_node.name,
                       c_node.source_op)
        out[c] = (fused, dict(c_attrs, pool=node.op), c_ops, out_shape)
        drop.add(k)
    return [e for j, e in enumerate(out) if j not in drop]


def _chain_layer(entry, shapes):
    """(k, n) of a dense entry that can be a layer of a fused chain: constant weights (and
    bias), no fused residual, float (not fixed point); else None."""
    node, attrs, operands, out_shape = entry
    if node.op != "dense" or "fixed" in attrs or "chain" in attrs or attrs.get("residual") \
            or not 2 <= len(operands) <= 3 or any(n in shapes for n in operands[1:]) \
            or operands[0] not in shapes or not out_shape:
        return None
    return shapes[operands[0]][-1], out_shape[-1]


def _fuse_dense_chain(entries, shapes, outputs, device_ops):
    """Consecutive dense layers (Gemm/MatMul, bias, activation) where each output is read only
    by the next layer, as its input, and is not a graph output, as one dense step with attrs
    ``chain`` (each layer's attrs) and ``counts`` (each layer's constant operands: weight, or
    weight and bias) on the operands [x, w1, (b1), w2, (b2), ...], on a device whose dense
    builder takes it (build_dense.fused_chain(rows, [(k, n), ...]) says which chains are worth
    it): the cpu device runs blocks of rows through every layer, its intermediates in cache.
    The chain runs where its last layer stood."""
    fits = getattr(device_ops.get("dense"), "fused_chain", None) if device_ops else None
    if not callable(fits):
        return entries
    readers, by_out = _readers_and_producers(entries)
    # the one dense layer that reads each dense layer's output, when it is the only reader
    next_of = {}
    for k, entry in enumerate(entries):
        if _chain_layer(entry, shapes) is None:
            continue
        src = entry[2][0]
        j = by_out.get(src)
        if j is not None and src not in outputs and readers.get(src) == 1 and \
                _chain_layer(entries[j], shapes) is not None:
            next_of[j] = k
    # chains start at a layer that reads no chained one; one cut short by fits() (or a layer
    # that fits in no chain) goes on from the layer after it
    pending = sorted(set(next_of) - set(next_of.values()), reverse=True)
    out, drop = list(entries), set()
    while pending:
        chain = [pending.pop()]
        rows = math.prod(entries[chain[0]][3][:-1])
        while chain[-1] in next_of:
            candidate = chain + [next_of[chain[-1]]]
            if not fits(rows, [_chain_layer(entries[j], shapes) for j in candidate]):
                break
            chain = candidate
        if chain[-1] in next_of:
            pending.append(next_of[chain[-1]])
        if len(chain) < 2:
            continue
        layers = [entries[j] for j in chain]
        operands = [layers[0][2][0]] + [name for _, _, ops, _ in layers for name in ops[1:]]
        name = "+".join(n.name for n, _, _, _ in layers)
        attrs = {"chain": tuple(a for _, a, _, _ in layers),
                 "counts": tuple(len(ops) - 1 for _, _, ops, _ in layers), "node": name}
        last_node, _, _, last_shape = layers[-1]
        fused = G.Node("dense", operands, last_node.outputs, {"chain": len(chain)}, name,
                       last_node.source_op)
        out[chain[-1]] = (fused, attrs, operands, last_shape)
        drop.update(chain[:-1])
    return [e for j, e in enumerate(out) if j not in drop]


def _readers_and_producers(entries):
    """How many entries read each tensor, and the index of the entry producing each one."""
    readers: dict[str, int] = {}
    for _, _, operands, _ in entries:
        for n in operands:
            readers[n] = readers.get(n, 0) + 1
    return readers, {node.outputs[0]: k for k, (node, _, _, _) in enumerate(entries)}


def _live_entries(entries, outputs):
    """The entries whose outputs something reads (a graph output or a later entry)."""
    needed, keep = set(outputs), []
    for entry in reversed(entries):
        node, _, operands, _ = entry
        if node.outputs[0] in needed:
            keep.append(entry)
            needed.update(operands)
    return keep[::-1]
