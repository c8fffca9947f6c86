"""Seeded mutations of ONNX models, and the worker that loads and runs each mutant (issue 15).

``mutant(seed_model, seed, index)`` is deterministic: a failure is reproduced from its numbers,
``python tests/fuzz_mutations.py --repro SEED_NAME SEED INDEX --device cpu`` (prints the
outcome and writes the mutant to ./mutant.onnx).

Mutations: byte flips, insertions, deletions and truncations of the serialized model, and
structure-aware edits: attribute values and types (ints, lists, strings, non-UTF-8 bytes),
added attributes (kernel_shape, group, pads, auto_pad, axis...), graph input dims, initializer
dims (swapped, resized, zero), element types, raw_data cut or grown, node inputs swapped or
renamed, outputs dropped, op types changed, nodes deleted or duplicated.

The worker (``--worker --device D``) reads mutant numbers on stdin, one per line, and answers
one JSON line per mutant after a ``start`` line, so that the parent (tests/test_fuzz.py)
knows which mutant crashed or hung the process. Outcomes:
    "ok"        offload and onnxruntime both ran and agree
    "refused"   offload raised an OffloadError (whether or not onnxruntime ran it)
    "both_refuse" is folded into "refused"
    "raw"       FAILURE: an exception that is not an OffloadError escaped offload
    "numbers"   FAILURE: offload returned numbers for a model onnxruntime refuses
    "mismatch"  FAILURE: both ran and the outputs differ (rtol 1e-3, atol 1e-4; where an
                output holds inf or NaN only the positions finite in both are compared, the
                one listed exception: folding rewrites turn inf into NaN and back)
(crash and hang are seen by the parent.)
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np
import onnx
from onnx import helper

ELEMENT_TYPES = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 77]
INT_VALUES = [-(2 ** 31), -7, -2, -1, 0, 1, 2, 3, 5, 64, 2 ** 20, 2 ** 31 - 1]
FLOAT_VALUES = [float("nan"), float("inf"), -1.0, 0.0, 1e-30, 1e30, 2.5]
OP_TYPES = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Div", "MaxPool", "AveragePool", "Reshape",
            "Concat", "Softmax", "Flatten", "Transpose", "Pad", "Gather", "Identity", "Slice",
            "BatchNormalization", "ConstantOfShape", "Range", "Cast", "Squeeze", "Unsqueeze"]
NEW_ATTRS = [("kernel_shape", [1, 1]), ("kernel_shape", [64, 1]), ("group", 2), ("group", 3),
             ("pads", [2, 2, 2, 2]), ("pads", [-1, 0, 0, 0]), ("strides", [0, 1]),
             ("dilations", [3, 3]), ("auto_pad", "BOGUS"), ("auto_pad", "SAME_LOWER"),
             ("axis", 5), ("axis", -9), ("perm", [0, 0]), ("transB", 1), ("transA", 1),
             ("ceil_mode", 1), ("to", 8), ("to", 99), ("allowzero", 1), ("keepdims", 0)]
MAX_INPUT_ELEMENTS = 1 << 20  # a mutant that asks for a larger input is loaded, not called


# ---------------------------------------------------------------------------------------------
# seeds

def seed_models() -> dict[str, bytes]:
    """The models mutated: three zoo models and a few built graphs from tests/onnx_cases."""
    from offload import zoo
    out = {name: zoo.build(name).SerializeToString() for name in ("jet_mlp", "jet_cnn",
                                                                  "hcal_mlp")}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import onnx_cases
    for name in ("small_cnn", "conv_group2", "gemm_alpha_beta", "reshape_zero_minus1",
                 "concat_two_branches", "pad_constant_value", "slice_axes_steps",
                 "gather_axis1", "constant_subgraph_fold", "shape_subgraph_flatten",
                 "avgpool_3x3_s2_p1_include_pad", "two_inputs_two_outputs", "batchnorm_4d"):
        out[name] = onnx_cases.get_case(name).model.SerializeToString()
    return out


# ---------------------------------------------------------------------------------------------
# mutations

def _byte_edit(data: bytes, rng) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(rng.integers(0, 256, 8, dtype=np.uint8))
    kind = rng.integers(4)
    if kind == 0:  # flip bits
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(b))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # insert bytes
        i = rng.integers(len(b) + 1)
        b[i:i] = rng.integers(0, 256, rng.integers(1, 17), dtype=np.uint8).tobytes()
    elif kind == 2:  # delete a chunk
        i = rng.integers(len(b))
        del b[i:i + int(rng.integers(1, 33))]
    else:  # truncate
        del b[rng.integers(len(b)):]
    return bytes(b)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))] if len(seq) else None


def _edit_attribute(m, rng):
    nodes = [n for n in m.graph.node if n.attribute]
    node = _pick(rng, nodes)
    if node is None:
        return _add_attribute(m, rng)
    a = _pick(rng, node.attribute)
    kind = rng.integers(6)
    if kind == 0:  # a value of the wrong type
        name = a.name
        node.attribute.remove(a)
        wrong = _pick(rng, [1.5, 3, [1, 2, 3], "text", [0.5, 0.25]])
        node.attribute.append(helper.make_attribute(name, wrong))
    elif a.type == onnx.AttributeProto.INT:
        a.i = _pick(rng, INT_VALUES)
    elif a.type == onnx.AttributeProto.INTS and len(a.ints):
        ints = list(a.ints)
        op = rng.integers(3)
        if op == 0:
            ints[rng.integers(len(ints))] = _pick(rng, INT_VALUES)
        elif op == 1:
            ints.pop(rng.integers(len(ints)))
        else:
            ints.append(_pick(rng, INT_VALUES))
        del a.ints[:]
        a.ints.extend(ints)
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = _pick(rng, FLOAT_VALUES)
    elif a.type == onnx.AttributeProto.STRING:
        a.s = _pick(rng, [b"BOGUS", b"\xff\xfe\x00", b"", b"SAME_UPPER", b"VALID"])
    elif a.type == onnx.AttributeProto.TENSOR:
        _edit_tensor(a.t, rng)
    else:
        node.attribute.remove(a)
    return m


def _add_attribute(m, rng):
    node = _pick(rng, m.graph.node)
    if node is None:
        return m
    name, value = _pick(rng, NEW_ATTRS)
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))
    return m


def _resize(t, rng) -> bool:
    """Give ``t`` new, consistent data with one axis resized (or one more axis): valid
    protobuf, a valid tensor, operands that now disagree with the attributes and each other."""
    from onnx import numpy_helper
    try:
        a = numpy_helper.to_array(t)
    except Exception:
        return False
    shape = list(a.shape)
    if shape and rng.random() < 0.8:
        i = int(rng.integers(len(shape)))
        shape[i] = _pick(rng, [0, 1, 2, 3, max(shape[i] - 1, 0), shape[i] + 1, shape[i] * 2])
    else:
        shape.insert(int(rng.integers(len(shape) + 1)), _pick(rng, [1, 2]))
    if np.prod(shape, dtype=np.float64) > 1 << 20:
        return False
    if a.dtype.kind == "f":
        new = rng.standard_normal(shape).astype(a.dtype)
    else:
        new = rng.integers(-3, 8, shape).astype(a.dtype)
    t.CopyFrom(numpy_helper.from_array(new, t.name))
    return True


def _edit_tensor(t, rng):
    kind = rng.integers(8)
    if kind >= 5 and _resize(t, rng):
        return
    dims = list(t.dims)
    if kind == 0 and len(dims) >= 2:  # same size, another shape: the attributes disagree
        i, j = rng.choice(len(dims), 2, replace=False)
        dims[i], dims[j] = dims[j], dims[i]
    elif kind == 1 and dims:
        dims[rng.integers(len(dims))] = _pick(rng, [0, 1, 2, 3, 7, 64, -1, 2 ** 40])
    elif kind == 2:
        t.data_type = _pick(rng, ELEMENT_TYPES)
    elif kind == 3 and t.raw_data:
        t.raw_data = t.raw_data[:int(rng.integers(len(t.raw_data)))]
    elif kind == 4 and t.raw_data:
        t.raw_data = t.raw_data + bytes(int(rng.integers(1, 64)))
    else:
        dims = dims[:-1] if dims and rng.integers(2) else dims + [1]
    del t.dims[:]
    t.dims.extend(dims)


def _edit_initializer(m, rng):
    t = _pick(rng, m.graph.initializer)
    if t is None:
        return _edit_attribute(m, rng)
    _edit_tensor(t, rng)
    return m


def _edit_input(m, rng):
    inits = {t.name for t in m.graph.initializer}
    inputs = [v for v in m.graph.input if v.name not in inits]
    v = _pick(rng, inputs)
    if v is None:
        return m
    t = v.type.tensor_type
    kind = rng.integers(4)
    if kind == 0:
        t.elem_type = _pick(rng, ELEMENT_TYPES)
    elif kind == 1 and len(t.shape.dim):
        d = t.shape.dim[int(rng.integers(len(t.shape.dim)))]
        value = _pick(rng, [0, 1, 2, 5, 100, 10 ** 6, "M"])
        if isinstance(value, str):
            d.dim_param = value
        else:
            d.dim_value = value
    elif kind == 2:
        t.shape.dim.add().dim_value = 1
    elif len(t.shape.dim):
        del t.shape.dim[-1]
    return m


def _edit_node(m, rng):
    nodes = m.graph.node
    node = _pick(rng, nodes)
    if node is None:
        return m
    kind = rng.integers(7)
    names = [i for n in nodes for i in n.input] + [t.name for t in m.graph.initializer]
    if kind == 0 and len(node.input) >= 2:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    elif kind == 1 and node.input:
        node.input[int(rng.integers(len(node.input)))] = _pick(rng, names + ["", "nowhere"])
    elif kind == 2:
        del node.output[:]
    elif kind == 3:
        node.op_type = _pick(rng, OP_TYPES)
    elif kind == 4:
        nodes.remove(node)
    elif kind == 5:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.insert(int(rng.integers(len(nodes) + 1)), copy)
    else:
        node.input.append(_pick(rng, names))
    return m


STRUCTURED = (_edit_attribute, _add_attribute, _edit_initializer, _edit_input, _edit_node)


def mutant(data: bytes, seed: int, index: int) -> bytes:
    """Mutant ``index`` of the serialized model ``data`` for run ``seed``: 1-3 edits, one in ten
    on bytes, the rest on the parsed model."""
    rng = np.random.default_rng([seed, index])
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.1:
            data = _byte_edit(data, rng)
            continue
        m = onnx.ModelProto()
        try:
            m.ParseFromString(data)
        except Exception:
            data = _byte_edit(data, rng)
            continue
        try:
            m = STRUCTURED[int(rng.integers(len(STRUCTURED)))](m, rng)
            data = m.SerializeToString()
        except Exception:  # an edit that does not apply to this (already mutated) model
            continue
    return data


def plan_of(n: int, seeds: list[str], seed: int) -> list[tuple[str, int]]:
    """(seed model, mutant index) for ``n`` mutants spread over ``seeds``."""
    return [(seeds[i % len(seeds)], i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# running one mutant

def _inputs(data: bytes, rng):
    """Inputs for a mutant's graph inputs (free axes: 2), or None when they would be too large."""
    m = onnx.ModelProto()
    m.ParseFromString(data)
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for v in m.graph.input:
        if v.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in
                v.type.tensor_type.shape.dim]
        if any(d < 0 for d in dims) or np.prod(dims, dtype=np.float64) > MAX_INPUT_ELEMENTS:
            return None
        feeds[v.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run_one(data: bytes, device: str) -> dict:
    """Load and call one mutant on ``device`` and on onnxruntime; the outcome (module doc)."""
    import offload
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    ours = theirs = None
    try:
        model = offload.load(data, device=device)
        try:
            feeds = _inputs(data, rng)
        except Exception:
            feeds = None
        if feeds is not None:
            names = [t.name for t in model.inputs]
            if set(names) != set(feeds):
                raise AssertionError(f"offload's inputs {names} are not the graph's {sorted(feeds)}")
            ours = model(*[feeds[k] for k in names])
            ours = list(ours) if isinstance(ours, tuple) else [ours]
        model.close()
    except offload.OffloadError as e:
        return {"outcome": "refused", "error": type(e).__name__, "message": str(e)[:300]}
    except BaseException as e:  # noqa: BLE001 - this is what the fuzzer looks for
        return {"outcome": "raw", "error": type(e).__name__, "message": str(e)[:300],
                "traceback": traceback.format_exc()[-1500:]}
    if ours is None:
        return {"outcome": "refused", "error": "", "message": "loaded; input too large to call"}
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        theirs = session.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "numbers", "message": f"onnxruntime refuses: {str(e)[:300]}"}
    for k, (a, b) in enumerate(zip(ours, theirs)):
        b = np.asarray(b)
        if a.shape != b.shape:
            return {"outcome": "mismatch", "message": f"output {k}: shape {a.shape} vs "
                    f"onnxruntime {b.shape}"}
        if b.dtype.kind != "f":
            b = b.astype(np.float32)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            # deliberate exception: with non-finite weights or inputs, rewrites (alpha and
            # BatchNorm folded into weights, fused epilogues) turn an inf into a NaN or back;
            # only the positions where both are finite are compared
            keep = np.isfinite(a) & np.isfinite(b)
            a, b = a[keep], b[keep]
        # compared in chunks: isclose's temporaries over a GB-sized output (a mutant's huge pad)
        # would exhaust the worker's address-space cap that the model itself fitted in
        a, b = a.reshape(-1), b.reshape(-1)
        bad, worst = 0, 0.0
        for i in range(0, a.size, 1 << 22):
            x, y = a[i:i + (1 << 22)], b[i:i + (1 << 22)]
            off = ~np.isclose(x, y, rtol=1e-3, atol=1e-4, equal_nan=True)
            if off.any():
                bad += int(off.sum())
                worst = max(worst, float(np.nanmax(np.abs(x - y))))
        if bad:
            return {"outcome": "mismatch", "message": f"output {k}: {bad} of {a.size} values "
                    f"differ, max |diff| {worst:.3g}"}
    return {"outcome": "ok"}


def worker(device: str, seed: int) -> None:
    """Read "SEED_NAME INDEX" lines; answer "start INDEX" then one JSON line per mutant."""
    import warnings
    warnings.simplefilter("ignore")
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(4)
    except Exception:
        pass
    seeds = seed_models()
    for line in sys.stdin:
        name, index = line.split()
        index = int(index)
        print(f"start {name} {index}", flush=True)  # before mutating: all of it is timed
        result = run_one(mutant(seeds[name], seed, index), device)
        result.update(seed_model=name, index=index)
        print("result " + json.dumps(result), flush=True)


def main(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repro", nargs=3, metavar=("SEED_MODEL", "SEED", "INDEX"))
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.device, a.seed)
    if a.repro:
        name, seed, index = a.repro[0], int(a.repro[1]), int(a.repro[2])
        data = mutant(seed_models()[name], seed, index)
        with open("mutant.onnx", "wb") as f:
            f.write(data)
        print(json.dumps(run_one(data, a.device), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
