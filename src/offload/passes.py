"""Graph rewrites, run once at load. Each is a small function Graph -> Graph (in place)."""

from __future__ import annotations

import numpy as np

from . import checks
from . import graph as G
from .errors import ModelFormatError, ShapeError, UnsupportedOpError

FOLDABLE = (G.DEVICE_OPS | G.VIEW_OPS | G.HOST_OPS | G.PLAN_OPS | {"gemm", "clip"}) - {"shape"}


def optimize(graph: G.Graph, label: str, shapes: dict[str, tuple],
             memory_limit: int | None = None) -> G.Graph:
    """The load-time pipeline: check every node (offload.checks), fold, lower to IR, fold
    BatchNorm, fuse bias, residual adds and activations. ``shapes`` are ONNX shape inference's
    (free axes as names); ``memory_limit`` bounds what folding may allocate (checks.memory_limit)."""
    ranks = {name: len(shape) for name, shape in shapes.items()}
    limit = checks.memory_limit(memory_limit)
    # validated twice: with the constants of the file, then with those folding computed
    for rewrite in (legacy_broadcast, validate, remove_identities, fold_constants, validate, fuse_layernorm,
                    lower_branches, lower, fold_batchnorm, fuse_bias, fuse_residual,
                    fuse_activation, eliminate_dead_nodes, contiguous_constants):
        graph = rewrite(graph, label=label, ranks=ranks, shapes=shapes, limit=limit)
    graph.names = None  # _new_constant's counters; not needed after load
    return graph


def legacy_broadcast(graph, label, ranks, **_):
    """Binary ops of opsets before 7 with ``broadcast=1, axis=k``: B is aligned with A from
    axis k, so B gets trailing 1-axes (an unsqueeze) and NumPy broadcasting then agrees."""
    out = []
    for node in graph.nodes:
        axis = node.attrs.pop("legacy_axis", None) if node.op in ("add", "sub", "mul",
                                                                  "div") else None
        if axis is not None:
            a, b = node.inputs[:2]
            rank_a = ranks.get(a)
            rank_b = graph.constants[b].ndim if b in graph.constants else ranks.get(b)
            if rank_a is None or rank_b is None:
                G.raise_unsupported(label, [(node.source_op, node.name, "opset-6 broadcasting "
                                             "at an axis with operands of unknown rank")])
            axis = axis % max(rank_a, 1)
            trailing = rank_a - axis - rank_b
            if trailing > 0:
                aligned = f"{b}/aligned_at_{axis}"
                out.append(G.Node("unsqueeze", [b], [aligned],
                                  {"axes": tuple(range(rank_b, rank_b + trailing))},
                                  node.name, node.source_op))
                node.inputs = [a, aligned]
        out.append(node)
    graph.nodes = out
    return graph


def validate(graph, label, shapes, **_):
    """Every node's attributes against its operands (offload.checks), with ONNX shape
    inference's shapes and the constants known before folding."""
    c = graph.constants
    for node in graph.nodes:
        ins = [i if i else None for i in node.inputs]
        try:
            checks.check_node(node, [shapes.get(i) if i else None for i in ins],
                              [c.get(i) if i else None for i in ins])
        except (ModelFormatError, ShapeError) as e:
            raise type(e)(f"{label}: {e}") from None
    return graph


def _sole_consumer(graph: G.Graph, name: str, uses: dict) -> G.Node | None:
    users = uses.get(name, [])
    if len(users) == 1 and name not in graph.outputs:
        return users[0]
    return None


def remove_identities(graph, **_):
    """Drop identity/dropout nodes by pointing their consumers at their input."""
    keep = []
    rename: dict[str, str] = {}
    read_in_branches = {i for n in graph.nodes if n.op == "if" for i in n.inputs}
    for node in graph.nodes:
        node.inputs = [rename.get(i, i) for i in node.inputs]
        if node.op == "identity" and node.outputs[0] not in graph.outputs and \
                node.outputs[0] not in read_in_branches:
            rename[node.outputs[0]] = node.inputs[0]
            continue
        keep.append(node)
    graph.nodes = keep
    return graph


def fold_constants(graph, limit, **_):
    """Evaluate every node whose inputs are all constants (initializers, Constant nodes)."""
    keep = []
    for node in graph.nodes:
        if node.op in FOLDABLE and all(not i or i in graph.constants for i in node.inputs):
            values = checks.evaluate(node, [graph.constants.get(i) if i else None
                                            for i in node.inputs], limit)
            for name, value in zip(node.outputs, values):
                graph.constants[name] = np.asarray(value)
            continue
        keep.append(node)
    graph.nodes = keep
    return graph


def fuse_layernorm(graph, ranks, **_):
    """LayerNorm written out (ReduceMean, Sub, Pow 2 or Mul, ReduceMean, Add eps, Sqrt, Div, and
    an optional constant Mul and Add), over the last axis, -> one fused layernorm node."""
    c, uses, producers = graph.constants, graph.consumers(), graph.producers()

    def only(name, op, fn=None):
        n = producers.get(name)
        if n is None or n.op != op or (fn and n.attrs.get("fn") != fn):
            return None
        return n

    def last_axis(node):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] in c:
            axes = [int(v) for v in np.asarray(c[node.inputs[1]]).reshape(-1)]
        rank = ranks.get(node.inputs[0])
        return axes is not None and len(axes) == 1 and node.attrs.get("keepdims", 1) and (
            axes[0] == -1 or (rank is not None and axes[0] == rank - 1))

    def scalar(name, value=None):
        v = c.get(name)
        return v is not None and np.asarray(v).size == 1 and (
            value is None or float(np.asarray(v).reshape(-1)[0]) == value)

    drop, fused = set(), {}
    for div in graph.nodes:
        if div.op != "div" or len(div.inputs) != 2:
            continue
        d, s = div.inputs
        sqrt = only(s, "elementwise", "sqrt")
        sub = only(d, "sub")
        add = sqrt and only(sqrt.inputs[0], "add")
        if not (sub and add):
            continue
        v, eps = add.inputs if scalar(add.inputs[1]) else add.inputs[::-1]
        var, mean = only(v, "reduce", "mean"), only(sub.inputs[1], "reduce", "mean")
        if not (var and mean and scalar(eps) and last_axis(var) and last_axis(mean)
                and mean.inputs[0] == sub.inputs[0]):
            continue
        sq = producers.get(var.inputs[0])
        if not (sq and ((sq.op == "elementwise" and sq.attrs.get("fn") == "pow" and
                         sq.inputs[0] == d and scalar(sq.inputs[1], 2.0)) or
                        (sq.op == "mul" and sq.inputs == [d, d]))):
            continue
        inner = [mean, sub, sq, var, add, sqrt]
        outside = [n for t in (mean, sq, var, add, sqrt) for o in t.outputs
                   for n in uses.get(o, []) if n not in inner + [div]]
        d_users = [n for n in uses.get(d, []) if n not in (sq, div)]
        if outside or d_users or any(o in graph.outputs for t in inner for o in t.outputs):
            continue
        x, out, tail = sub.inputs[0], div.outputs[0], [div]
        scale = bias = None
        after = _sole_consumer(graph, out, uses)
        if after is not None and after.op == "mul":
            other = [i for i in after.inputs if i != out]
            if len(other) == 1 and other[0] in c and np.asarray(c[other[0]]).ndim <= 1:
                scale, out = other[0], after.outputs[0]
                tail.append(after)
                nxt = _sole_consumer(graph, out, uses)
                if nxt is not None and nxt.op == "add":
                    other = [i for i in nxt.inputs if i != out]
                    if len(other) == 1 and other[0] in c and np.asarray(c[other[0]]).ndim <= 1:
                        bias, out = other[0], nxt.outputs[0]
                        tail.append(nxt)
        if scale is None:
            scale = _new_constant(graph, div.name + "/ones", np.ones(1, np.float32))
        eps_v = float(np.asarray(c[eps]).reshape(-1)[0])
        drop.update(id(n) for n in inner + tail)
        fused[id(tail[-1])] = G.Node("layernorm", [x, scale] + ([bias] if bias else []), [out],
                                     {"axis": -1, "epsilon": eps_v}, div.name, "LayerNorm")
    if fused:
        graph.nodes = [fused.get(id(n), n) for n in graph.nodes
                       if id(n) in fused or id(n) not in drop]
    return graph


def lower(graph, label, **_):
    """Turn gemm/matmul/clip into IR ops; check that weights are constants."""
    c = graph.constants
    out, problems = [], []

    def const(name):
        return c.get(name) if name else None

    for node in graph.nodes:
        if node.op == "matmul":
            w = const(node.inputs[1])
            if w is None or w.ndim != 2:
                out.append(node)  # a product of run-time tensors: the matmul device op
                continue
            node.op, node.attrs = "dense", {"activation": "identity"}
            node.inputs[1] = _new_constant(graph, node.name + "/weight", w.astype(np.float32))
            out.append(node)
        elif node.op == "gemm":
            out.extend(_lower_gemm(graph, node, problems))
        elif node.op == "conv2d":
            w = const(node.inputs[1])
            bias = node.inputs[2] if len(node.inputs) > 2 else ""
            if w is None or w.ndim != 4 or (bias and const(bias) is None):
                problems.append(("Conv", node.name, "weights and bias must be constants of a 2-D "
                                 "convolution"))
                continue
            if node.attrs["kernel"] is None:
                node.attrs["kernel"] = tuple(w.shape[2:])
            node.inputs = node.inputs[:2] + ([bias] if bias else [])
            out.append(node)
        elif node.op == "clip":
            lo, hi = (node.inputs + ["", ""])[1:3]
            if (lo and const(lo) is None) or (hi and const(hi) is None):
                bounds = []  # run-time bounds: the elementwise clip row
                for name, value in ((lo, -np.inf), (hi, np.inf)):
                    bounds.append(name or _new_constant(graph, node.name + "/bound",
                                                        np.array(value, np.float32)))
                out.append(G.Node("elementwise", node.inputs[:1] + bounds, node.outputs,
                                  {"fn": "clip"}, node.name, node.source_op))
                continue
            out.append(G.Node("activation", node.inputs[:1], node.outputs, {
                "fn": "clip", "lo": float(const(lo).reshape(-1)[0]) if lo else -np.inf,
                "hi": float(const(hi).reshape(-1)[0]) if hi else np.inf}, node.name))
        elif node.op == "layernorm" and any(const(i) is None for i in node.inputs[1:]):
            out.extend(_layernorm_written_out(graph, node))
        elif node.op == "rnn":  # weights known at load are re-laid out once by the builders
            weights = [name for role, name in zip(node.attrs["roles"], node.inputs)
                       if role in ("w", "r", "b", "p")]
            node.attrs = dict(node.attrs, constant_weights=all(const(i) is not None
                                                               for i in weights))
            out.append(node)
        elif node.op == "batchnorm":
            if any(const(i) is None for i in node.inputs[1:5]):
                problems.append(("BatchNormalization", node.name,
                                 "scale, bias, mean and variance must be constants"))
                continue
            out.append(node)
        else:
            out.append(node)
    if problems:
        G.raise_unsupported(label, problems)
    graph.nodes = out
    return graph


def _layernorm_written_out(graph, node):
    """A layernorm with run-time scale or bias as reductions and elementwise rows (mean,
    centred variance)."""
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else ""
    axis, eps = node.attrs["axis"], node.attrs["epsilon"]
    t = {k: f"{node.outputs[0]}/{k}" for k in ("mean", "d", "d2", "var", "std", "norm",
                                               "scaled", "prod")}
    eps_name = _new_constant(graph, node.name + "/epsilon", np.array(eps, np.float32))
    red = {"fn": "mean", "keepdims": 1, "noop_with_empty_axes": 0, "from_axis": axis}

    def n(op, ins, out, attrs):
        return G.Node(op, ins, [out], attrs, node.name, node.source_op)
    nodes = [n("reduce", [x], t["mean"], dict(red)),
             n("elementwise", [x, t["mean"]], t["d"], {"fn": "sub"}),
             n("elementwise", [t["d"], t["d"]], t["d2"], {"fn": "mul"}),
             n("reduce", [t["d2"]], t["var"], dict(red)),
             n("elementwise", [t["var"], eps_name], t["std"], {"fn": "add"}),
             n("elementwise", [t["std"]], t["norm"], {"fn": "sqrt"}),
             n("elementwise", [t["d"], t["norm"]], t["scaled"], {"fn": "div"})]
    out = node.outputs[0]
    if bias:
        nodes += [n("elementwise", [t["scaled"], scale], t["prod"], {"fn": "mul"}),
                  n("elementwise", [t["prod"], bias], out, {"fn": "add"})]
    else:
        nodes.append(n("elementwise", [t["scaled"], scale], out, {"fn": "mul"}))
    return nodes


def _new_constant(graph, base: str, value: np.ndarray) -> str:
    """Add a constant under a new name from ``base`` (base, base', base'1, base'2, ...): a counter
    per base keeps this constant-time when many nodes share one name (legal ONNX)."""
    names = getattr(graph, "names", None)
    if names is None:
        names = graph.names = {}
    name = base
    if name in graph.constants:
        k = names.get(base, 0)
        while True:
            k += 1
            name = f"{base}'{k}"
            if name not in graph.constants:
                break
        names[base] = k
    graph.constants[name] = value
    return name


def _lower_gemm(graph, node, problems):
    a = node.attrs
    b = graph.constants.get(node.inputs[1])
    if b is None or b.ndim != 2:
        return _gemm_runtime(graph, node)
    w = (b.T if a.get("transB", 0) else b).astype(np.float64) * a.get("alpha", 1.0)
    nodes, x = [], node.inputs[0]
    if a.get("transA", 0):
        xt = node.name + "/transA"
        nodes.append(G.Node("transpose", [x], [xt], {"perm": (1, 0)}, node.name))
        x = xt
    inputs = [x, _new_constant(graph, node.name + "/weight", w.astype(np.float32))]
    cname = node.inputs[2] if len(node.inputs) > 2 else ""
    beta = a.get("beta", 1.0)
    c = graph.constants.get(cname) if cname else None
    y = node.outputs[0]
    if c is not None and (c.ndim <= 1 or c.shape[0] == 1) and c.size in (1, w.shape[1]):
        bias = np.broadcast_to(c.reshape(-1) * beta, (w.shape[1],)).astype(np.float32)
        inputs.append(_new_constant(graph, node.name + "/bias", bias))
        cname = ""
    dense_out = y if not cname else node.name + "/gemm"
    nodes.append(G.Node("dense", inputs, [dense_out], {"activation": "identity"}, node.name))
    if cname:  # a C that is not a bias row: added after the product, broadcast to its shape
        # only (ONNX: C unidirectionally broadcastable to [M, N]; numpy's two-way broadcasting
        # would turn a [64, 1] C and a batch of 1 into a [64, 64] output)
        into = {"into_first": True}
        if c is not None:
            nodes.append(G.Node("add", [dense_out, _new_constant(graph, node.name + "/C",
                                (c * beta).astype(np.float32))], [y], into, node.name, "Gemm"))
        elif beta == 1.0:
            nodes.append(G.Node("add", [dense_out, cname], [y], into, node.name, "Gemm"))
        else:
            scaled = node.name + "/betaC"
            beta_name = _new_constant(graph, node.name + "/beta", np.float32(beta))
            nodes += [G.Node("mul", [cname, beta_name], [scaled], {}, node.name),
                      G.Node("add", [dense_out, scaled], [y], into, node.name, "Gemm")]
    return nodes


def _gemm_runtime(graph, node):
    """Gemm with a run-time B: transposes, a matmul and elementwise alpha/beta rows."""
    a, nodes = node.attrs, []
    ins = list(node.inputs)

    def temp(base):
        return f"{node.name}/{base}"

    for k, flag in ((0, "transA"), (1, "transB")):
        if a.get(flag, 0):
            nodes.append(G.Node("transpose", [ins[k]], [temp(flag)], {"perm": (1, 0)},
                                node.name, node.source_op))
            ins[k] = temp(flag)
    c = ins[2] if len(ins) > 2 else ""
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    prod = node.outputs[0] if not c and alpha == 1.0 else temp("product")
    nodes.append(G.Node("matmul", ins[:2], [prod], {}, node.name, node.source_op))
    if alpha != 1.0:
        scaled = node.outputs[0] if not c else temp("alpha_product")
        nodes.append(G.Node("elementwise", [prod, _new_constant(
            graph, node.name + "/alpha", np.array(alpha, np.float32))], [scaled], {"fn": "mul"},
            node.name, node.source_op))
        prod = scaled
    if c:
        if beta != 1.0:
            nodes.append(G.Node("elementwise", [c, _new_constant(
                graph, node.name + "/beta", np.array(beta, np.float32))], [temp("beta_c")],
                {"fn": "mul"}, node.name, node.source_op))
            c = temp("beta_c")
        nodes.append(G.Node("elementwise", [prod, c], node.outputs,
                            {"fn": "add", "into_first": True}, node.name, node.source_op))
    return nodes


def _bn_scale_shift(graph, node):
    scale, bias, mean, var = (graph.constants[i].astype(np.float64) for i in node.inputs[1:5])
    s = scale / np.sqrt(var + node.attrs["epsilon"])
    return s, bias - mean * s


def fold_batchnorm(graph, ranks, **_):
    """Fold BatchNormalization into the conv/dense before it, or into the dense after it;
    otherwise lower it to a per-channel multiply and add."""
    uses, producers = graph.consumers(), graph.producers()
    out, removed = [], set()
    for node in graph.nodes:
        if id(node) in removed:
            continue
        if node.op != "batchnorm":
            out.append(node)
            continue
        s, t = _bn_scale_shift(graph, node)
        x = node.inputs[0]
        prev = producers.get(x)
        after = _sole_consumer(graph, node.outputs[0], uses)
        if (prev is not None and prev.op in ("conv2d", "dense") and _sole_consumer(graph, x, uses)
                and prev.attrs.get("activation") == "identity"
                and (prev.op == "conv2d" or ranks.get(x) == 2)):
            w = graph.constants[prev.inputs[1]].astype(np.float64)
            b = graph.constants[prev.inputs[2]].astype(np.float64) if len(prev.inputs) > 2 \
                else np.zeros(w.shape[0] if prev.op == "conv2d" else w.shape[1])
            w = w * (s.reshape(-1, 1, 1, 1) if prev.op == "conv2d" else s.reshape(1, -1))
            prev.inputs[1] = _new_constant(graph, prev.name + "/weight_bn", w.astype(np.float32))
            bias = _new_constant(graph, prev.name + "/bias_bn", (b * s + t).astype(np.float32))
            prev.inputs = prev.inputs[:2] + [bias]
            prev.outputs = node.outputs
            continue
        if (after is not None and after.op == "dense" and after.inputs[0] == node.outputs[0]
                and ranks.get(x) == 2):
            w = graph.constants[after.inputs[1]].astype(np.float64)
            b = graph.constants[after.inputs[2]].astype(np.float64) if len(after.inputs) > 2 \
                else np.zeros(w.shape[1])
            after.inputs[0] = x
            after.inputs[1] = _new_constant(graph, after.name + "/weight_bn",
                                            (s.reshape(-1, 1) * w).astype(np.float32))
            bias = _new_constant(graph, after.name + "/bias_bn", (b + t @ w).astype(np.float32))
            after.inputs = after.inputs[:2] + [bias]
            continue
        rank = ranks.get(x)
        if rank is None:  # ONNX shape inference lost it: shaped per channel at plan time
            s_name = _new_constant(graph, node.name + "/scale", s.astype(np.float32))
            t_name = _new_constant(graph, node.name + "/shift", t.astype(np.float32))
            out.append(G.Node("channel_affine", [x, s_name, t_name], node.outputs, {},
                              node.name, node.source_op))
            continue
        shape = (-1,) + (1,) * (rank - 2)
        scaled = node.name + "/scaled"
        s_name = _new_constant(graph, node.name + "/scale", s.reshape(shape).astype(np.float32))
        t_name = _new_constant(graph, node.name + "/shift", t.reshape(shape).astype(np.float32))
        out += [G.Node("mul", [x, s_name], [scaled], {}, node.name),
                G.Node("add", [scaled, t_name], node.outputs, {}, node.name)]
    graph.nodes = out
    return graph


def fuse_bias(graph, ranks, **_):
    """add(conv/dense, constant per-channel vector) -> the conv/dense's bias."""
    uses, producers = graph.consumers(), graph.producers()
    out = []
    for node in graph.nodes:
        if node.op == "add":
            x, cname = node.inputs
            prev = producers.get(x)
            c = graph.constants.get(cname)
            if c is None and x in graph.constants:  # constant first
                x, cname = cname, x
                prev, c = producers.get(x), graph.constants.get(cname)
            if (prev is not None and c is not None and prev.op in ("conv2d", "dense")
                    and prev.attrs.get("activation") == "identity"
                    and _sole_consumer(graph, x, uses) is node):
                w = graph.constants[prev.inputs[1]]
                channels = w.shape[0] if prev.op == "conv2d" else w.shape[1]
                rank = ranks.get(x)
                per_channel = (prev.op == "dense" and c.ndim <= 1 and c.size in (1, channels)) or \
                    (prev.op == "conv2d" and rank == 4 and c.ndim in (3, 4) and
                     c.shape[-2:] == (1, 1) and c.size in (1, channels) and
                     (c.ndim == 3 or c.shape[0] == 1))
                if per_channel:
                    b = graph.constants[prev.inputs[2]] if len(prev.inputs) > 2 else 0.0
                    bias = np.broadcast_to(b + c.reshape(-1), (channels,)).astype(np.float32)
                    prev.inputs = prev.inputs[:2] + [
                        _new_constant(graph, prev.name + "/bias_add", bias)]
                    prev.outputs = node.outputs
                    continue
        out.append(node)
    graph.nodes = out
    return graph


def fuse_residual(graph, shapes, **_):
    """add(conv/dense, r) with r a run-time tensor of the same shape -> the conv/dense adds r in
    its epilogue (before the activation), as ResNet's bottleneck needs."""
    uses, producers = graph.consumers(), graph.producers()
    out = []
    for node in graph.nodes:
        if node.op == "add" and not any(i in graph.constants for i in node.inputs):
            for y, r in (node.inputs, node.inputs[::-1]):
                prev = producers.get(y)
                same = shapes.get(y) is not None and shapes.get(y) == shapes.get(r) and \
                    None not in shapes[y]
                if (prev is not None and prev.op in ("conv2d", "dense") and same and y != r
                        and prev.attrs.get("activation") == "identity"
                        and not prev.attrs.get("residual")
                        and _sole_consumer(graph, y, uses) is node):
                    if len(prev.inputs) == 2:
                        w = graph.constants[prev.inputs[1]]
                        channels = w.shape[0] if prev.op == "conv2d" else w.shape[1]
                        prev.inputs.append(_new_constant(graph, prev.name + "/bias0",
                                                         np.zeros(channels, np.float32)))
                    prev.inputs.append(r)
                    prev.attrs = dict(prev.attrs, residual=True)
                    prev.outputs = node.outputs
                    # r may be computed after prev: prev now runs where the add stood
                    out[:] = [n for n in out if n is not prev]
                    out.append(prev)
                    break
            else:
                out.append(node)
            continue
        out.append(node)
    graph.nodes = out
    return graph


def fuse_activation(graph, **_):
    """activation(conv/dense), also through a squeeze/unsqueeze between them (a 1-D conv
    runs as a 2-D one between views) -> the conv/dense's fused epilogue."""
    uses, producers = graph.consumers(), graph.producers()
    out = []
    for node in graph.nodes:
        if node.op == "activation":
            prev = producers.get(node.inputs[0])
            view = None  # a squeeze/unsqueeze between (a 1-D conv run as 2-D): seen through
            if (prev is not None and prev.op in ("squeeze", "unsqueeze")
                    and _sole_consumer(graph, node.inputs[0], uses) is node):
                view, prev = prev, producers.get(prev.inputs[0])
            last = view if view is not None else node
            if (prev is not None and prev.op in ("conv2d", "dense")
                    and prev.attrs.get("activation") == "identity"
                    and _sole_consumer(graph, prev.outputs[0], uses) is last):
                prev.attrs = dict(prev.attrs, activation=node.attrs["fn"],
                                  **{k: node.attrs[k] for k in ("alpha", "lo", "hi")
                                     if k in node.attrs})
                (view if view is not None else prev).outputs = node.outputs
                continue
        out.append(node)
    graph.nodes = out
    return graph


def eliminate_dead_nodes(graph, **_):
    needed = set(graph.outputs)
    keep = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(i for i in node.inputs if i)
    graph.nodes = keep[::-1]
    graph.constants = {k: v for k, v in graph.constants.items() if k in needed}
    return graph


def lower_branches(graph, label, limit, **kw):
    """The branches of each ``if`` node folded and lowered as the graph is (no fusions); the
    node's inputs then list what the lowered branches read (new weight names included)."""
    for node in graph.nodes:
        if node.op != "if":
            continue
        for key in ("then", "else"):
            nodes, outputs = node.attrs[key]
            sub = G.Graph(list(nodes), [], list(outputs), graph.constants, graph.name)
            for rewrite in (lower_branches, fold_constants, lower):
                sub = rewrite(sub, label=label, limit=limit, **kw)
            node.attrs[key] = (sub.nodes, list(outputs))
        node.inputs = [node.inputs[0]] + G.branch_reads([node.attrs["then"], node.attrs["else"]])
    return graph


def contiguous_constants(graph, **_):
    """Float constants become C-contiguous float32 once, so plans share them without copies."""
    for name, value in graph.constants.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            graph.constants[name] = np.ascontiguousarray(value, dtype=np.float32)
    return graph
