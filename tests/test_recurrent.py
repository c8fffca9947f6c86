"""Recurrent taggers on every device: PyTorch nn.LSTM / nn.GRU exported by both of torch's
exporters, packed (variable-length) sequences, a Keras/tf2onnx-style graph built with
onnx.helper, LSTM/GRU attributes (clip, input_forget, peepholes, linear_before_reset, initial
states, sequence_lens), the DeepJet-sized tagger, and 1-D Conv/MaxPool/AveragePool, all against
onnxruntime at rtol = atol = 1e-4 at batches 1, 3 and 1024; layout = 1 (which onnxruntime
refuses) against the NumPy reference below. Bad sequence lengths, hidden sizes, directions and
activations are typed errors naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import offload

torch = pytest.importorskip("torch", reason="PyTorch is a test dependency (pip install torch)")
import recurrent_models as RM  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
BATCHES = (1, 3, 1024)


def batches(request, device):
    """1, 3 and 1024; on the emulations (conftest.SLOW_ON_EMULATION) 1 and 3 unless
    --emulation-full."""
    from conftest import full_on
    return BATCHES if full_on(request.config, device) else BATCHES[:2]


def onnxruntime(data: bytes):
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def check_all(data, device, feeds, what, want=None):
    got = offload.load(data, device=device)(feeds)
    got = got if isinstance(got, tuple) else (got,)
    want = onnxruntime(data).run(None, feeds) if want is None else want
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, err_msg=f"{what}: output {k} on {device}", **TOL)


# ---------------------------------------------------------------------------------------------
# NumPy reference of ONNX LSTM/GRU (float64), for layout 1 and to cross-check onnxruntime

def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(cell, x, w, r, b=None, lens=None, h0=None, c0=None, p=None, direction="forward",
              clip=0.0, input_forget=0, linear_before_reset=0, layout=0):
    """Y, Y_h (, Y_c) of one ONNX LSTM/GRU node as onnxruntime computes them (steps past a
    sequence's length: Y zero, state kept; a sequence of length 0: Y_h and Y_c zero)."""
    if layout:
        x = x.transpose(1, 0, 2)
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))
    t_len, batch, _ = x.shape
    d_count, gh, hidden = r.shape
    lens = np.full(batch, t_len) if lens is None else np.asarray(lens)
    b = np.zeros((d_count, 2 * gh)) if b is None else np.asarray(b, np.float64)
    cut = (lambda v: np.clip(v, -clip, clip)) if clip > 0 else (lambda v: v)
    y = np.zeros((t_len, d_count, batch, hidden))
    yh, yc = np.zeros((d_count, batch, hidden)), np.zeros((d_count, batch, hidden))
    rows = np.arange(batch)
    for d in range(d_count):
        rev = direction == "reverse" or (direction == "bidirectional" and d == 1)
        wb, rb = b[d, :gh], b[d, gh:]
        h = np.zeros((batch, hidden)) if h0 is None else np.array(h0[d], np.float64)
        c = np.zeros((batch, hidden)) if c0 is None else np.array(c0[d], np.float64)
        for s in range(t_len):
            active = s < lens
            t = np.where(rev, lens - 1 - s, s).clip(0, t_len - 1)
            xt = x[t, rows]
            if cell == "lstm":
                g = xt @ w[d].T + h @ r[d].T + wb + rb
                gi, go, gf, gc = np.split(g, 4, axis=1)
                if p is not None:
                    gi = gi + p[d, :hidden] * c
                    gf = gf + p[d, 2 * hidden:] * c
                i = _sigmoid(cut(gi))
                f = 1 - i if input_forget else _sigmoid(cut(gf))
                cn = f * c + i * np.tanh(cut(gc))
                if p is not None:
                    go = go + p[d, hidden:2 * hidden] * cn
                hn = _sigmoid(cut(go)) * np.tanh(cn)
                c = np.where(active[:, None], cn, c)
            else:
                xg = xt @ w[d].T + wb
                hr = h @ r[d].T
                z = _sigmoid(cut(xg[:, :hidden] + hr[:, :hidden] + rb[:hidden]))
                rr = _sigmoid(cut(xg[:, hidden:2 * hidden] + hr[:, hidden:2 * hidden]
                                  + rb[hidden:2 * hidden]))
                if linear_before_reset:
                    pre = xg[:, 2 * hidden:] + rr * (hr[:, 2 * hidden:] + rb[2 * hidden:])
                else:
                    pre = xg[:, 2 * hidden:] + (rr * h) @ r[d][2 * hidden:].T + rb[2 * hidden:]
                hn = (1 - z) * np.tanh(cut(pre)) + z * h
            h = np.where(active[:, None], hn, h)
            y[t[active], d, rows[active]] = hn[active]
        yh[d], yc[d] = h, c
        yh[d][lens == 0] = yc[d][lens == 0] = 0  # onnxruntime: no step, no state
    if layout:
        y, yh, yc = y.transpose(2, 0, 1, 3), yh.transpose(1, 0, 2), yc.transpose(1, 0, 2)
    outs = (y, yh, yc) if cell == "lstm" else (y, yh)
    return tuple(o.astype(np.float32) for o in outs)


def rnn_model(cell, inputs, hidden, batch="N", steps=7, direction="forward", layout=0,
              with_bias=True, with_lens=False, with_states=False, peepholes=False, opset=17,
              seed=0, outputs=None, **attrs):
    """One ONNX LSTM/GRU node with seeded weights (initializers); returns (bytes, weights)."""
    rng = np.random.default_rng(seed)
    g = 4 if cell == "lstm" else 3
    d = 2 if direction == "bidirectional" else 1
    weights = {"w": rng.uniform(-0.5, 0.5, (d, g * hidden, inputs)).astype(np.float32),
               "r": rng.uniform(-0.5, 0.5, (d, g * hidden, hidden)).astype(np.float32)}
    if with_bias:
        weights["b"] = rng.uniform(-0.5, 0.5, (d, 2 * g * hidden)).astype(np.float32)
    if peepholes:
        weights["p"] = rng.uniform(-0.5, 0.5, (d, 3 * hidden)).astype(np.float32)
    x_shape = [batch, steps, inputs] if layout else [steps, batch, inputs]
    s_shape = [batch, d, hidden] if layout else [d, batch, hidden]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", "w", "r", "b" if with_bias else ""]
    if with_lens:
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [batch]))
    names.append("lens" if with_lens else "")
    if with_states:
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, s_shape))
    names.append("h0" if with_states else "")
    if cell == "lstm":
        if with_states:
            graph_inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, s_shape))
        names.append("c0" if with_states else "")
        names.append("p" if peepholes else "")
    while names and not names[-1]:
        names.pop()
    outputs = outputs or (["y", "yh", "yc"] if cell == "lstm" else ["y", "yh"])
    y_shape = [batch, steps, d, hidden] if layout else [steps, d, batch, hidden]
    out_info = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if o == "y" else
                                              s_shape) for o in outputs if o]
    if layout:
        attrs["layout"] = 1
    node = helper.make_node(cell.upper(), names, outputs, name=f"{cell}_node",
                            hidden_size=hidden, direction=direction, **attrs)
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = helper.make_graph([node], f"{cell}_graph", graph_inputs, out_info, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString(), weights


def rnn_feeds(cell, batch, inputs, hidden, steps=7, d=1, layout=0, lens=False, states=False,
              seed=1):
    rng = np.random.default_rng(seed + batch)
    x = rng.standard_normal((batch, steps, inputs) if layout else (steps, batch, inputs))
    feeds = {"x": x.astype(np.float32)}
    if lens:
        feeds["lens"] = rng.integers(0, steps + 1, batch).astype(np.int32)
        feeds["lens"][0] = steps
    if states:
        shape = (batch, d, hidden) if layout else (d, batch, hidden)
        feeds["h0"] = rng.standard_normal(shape).astype(np.float32)
        if cell == "lstm":
            feeds["c0"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------
# PyTorch nn.LSTM / nn.GRU

TORCH_MODELS = {
    # name: (Stack keyword arguments, batch axis of the input)
    "lstm-2layer": (dict(cell="LSTM", layers=2), 1),
    "lstm-bi-batch-first": (dict(cell="LSTM", bidirectional=True, batch_first=True), 0),
    "lstm-bi-2layer-states": (dict(cell="LSTM", layers=2, bidirectional=True, states=True), 1),
    "gru-2layer-bi": (dict(cell="GRU", layers=2, bidirectional=True), 1),
    "gru-batch-first-states": (dict(cell="GRU", batch_first=True, states=True), 0),
}


def _torch_model(name):
    kwargs, axis = TORCH_MODELS[name]
    module = RM.seeded(RM.Stack(**kwargs), 7)
    layers = kwargs.get("layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    return module, axis, layers, kwargs


def _torch_feeds(name, batch):
    module, axis, layers, kwargs = _torch_model(name)
    rng = np.random.default_rng(batch)
    shape = [9, 9, 8]
    shape[axis] = batch
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if kwargs.get("states"):
        feeds["h0"] = rng.standard_normal((layers, batch, 20)).astype(np.float32)
        if kwargs["cell"] == "LSTM":
            feeds["c0"] = rng.standard_normal((layers, batch, 20)).astype(np.float32)
    return feeds


_EXPORTED = {}


def _export_torch(name, exporter):
    if (name, exporter) not in _EXPORTED:
        module, axis, layers, kwargs = _torch_model(name)
        feeds = _torch_feeds(name, 2)
        args = tuple(torch.from_numpy(v) for v in feeds.values())
        names = list(feeds)
        outputs = ["y", "h", "c"] if kwargs["cell"] == "LSTM" else ["y", "h"]
        try:
            if exporter == "legacy":
                import io
                f = io.BytesIO()
                axes = {n: {(axis if n == "x" else 1): "N"} for n in names}
                torch.onnx.export(module, args, f, dynamo=False, input_names=names,
                                  output_names=outputs, dynamic_axes=axes, opset_version=17)
                _EXPORTED[name, exporter] = f.getvalue()
            else:
                n = torch.export.Dim("N", min=1, max=4096)
                shapes = ({axis: n},)  # forward(x, *states)
                if len(names) > 1:
                    shapes += (tuple({1: n} for _ in names[1:]),)
                program = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                            output_names=outputs, dynamic_shapes=shapes,
                                            verbose=False)
                _EXPORTED[name, exporter] = program.model_proto.SerializeToString()
        except Exception as e:  # an exporter that cannot export this module
            _EXPORTED[name, exporter] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    data = _EXPORTED[name, exporter]
    if isinstance(data, str):
        pytest.skip(f"torch's {exporter} exporter does not export {name}: {data}")
    return data


@pytest.mark.parametrize("exporter", ("legacy", "dynamo"))
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_rnn_matches_onnxruntime(name, exporter, device, request):
    data = _export_torch(name, exporter)
    assert {"LSTM", "GRU"} & {n.op_type for n in onnx.load_from_string(data).graph.node}
    session = onnxruntime(data)
    model = offload.load(data, device=device)
    module = _torch_model(name)[0]
    for batch in batches(request, device):
        feeds = _torch_feeds(name, batch)
        want = session.run(None, feeds)
        got = model(feeds)
        for k, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g, w, err_msg=f"{name} ({exporter}) output {k} on "
                                                     f"{device}, batch {batch}", **TOL)
        if batch == 3:  # onnxruntime itself agrees with torch
            with torch.no_grad():
                ref = module(*(torch.from_numpy(v) for v in feeds.values()))
            np.testing.assert_allclose(got[0], ref[0].numpy(), **TOL)


@pytest.mark.parametrize("bidirectional", (False, True), ids=("forward", "bidirectional"))
def test_packed_sequences_match_onnxruntime(bidirectional, device, request):
    """pack_padded_sequence/pad_packed_sequence export sequence_lens: zeros past each length,
    Y_h the state at each sequence's own end (a length 0 included)."""
    module = RM.seeded(RM.Packed(bidirectional=bidirectional), 3)
    x, lens = torch.randn(2, 9, 6), torch.tensor([9, 4])
    data = RM.export(module, (x, lens), ["x", "lens"], ["y", "h"], "legacy")
    assert "LSTM" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    session = onnxruntime(data)
    model = offload.load(data, device=device)
    for batch in batches(request, device):
        rng = np.random.default_rng(batch)
        lens = np.sort(rng.integers(0, 10, batch))[::-1].astype(np.int64)
        lens[0] = 9
        feeds = {"x": rng.standard_normal((batch, 9, 6)).astype(np.float32), "lens": lens}
        want = session.run(None, feeds)
        for k, (g, w) in enumerate(zip(model(feeds), want)):
            np.testing.assert_allclose(g, w, err_msg=f"output {k} on {device}, batch {batch}",
                                       **TOL)


# ---------------------------------------------------------------------------------------------
# Keras / tf2onnx-style graphs

def keras_style(cell, steps=12, features=5, hidden=16, classes=4, seed=0):
    """tf2onnx's shape of a Keras LSTM/GRU tagger: [N, T, F] Transposed to time-major, the
    recurrent node without sequence_lens, Squeeze of the num_directions axis of Y_h, a dense
    layer and softmax (opset 13: Squeeze's axes an input)."""
    rng = np.random.default_rng(seed)
    g = 4 if cell == "lstm" else 3
    inits = {
        "W": rng.uniform(-0.4, 0.4, (1, g * hidden, features)).astype(np.float32),
        "R": rng.uniform(-0.4, 0.4, (1, g * hidden, hidden)).astype(np.float32),
        "B": rng.uniform(-0.4, 0.4, (1, 2 * g * hidden)).astype(np.float32),
        "axes0": np.array([0], np.int64), "axes1": np.array([1], np.int64),
        "dense_w": rng.uniform(-0.5, 0.5, (hidden, classes)).astype(np.float32),
        "dense_b": rng.uniform(-0.5, 0.5, (classes,)).astype(np.float32),
    }
    extra = {"linear_before_reset": 1} if cell == "gru" else {}  # Keras reset_after=True
    outs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_tm"], perm=[1, 0, 2], name="to_time_major"),
        helper.make_node(cell.upper(), ["x_tm", "W", "R", "B"], outs, hidden_size=hidden,
                         name=f"{cell}_layer", **extra),
        helper.make_node("Squeeze", ["Y_h", "axes0"], ["last"], name="squeeze_dirs"),
        helper.make_node("Squeeze", ["Y", "axes1"], ["seq_tm"], name="squeeze_y"),
        helper.make_node("Transpose", ["seq_tm"], ["sequence"], perm=[1, 0, 2],
                         name="to_batch_major"),
        helper.make_node("MatMul", ["last", "dense_w"], ["logits0"], name="dense"),
        helper.make_node("Add", ["logits0", "dense_b"], ["logits"], name="dense_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, f"keras_{cell}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", steps, features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("sequence", TensorProto.FLOAT, ["N", steps, hidden])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_keras_style_graph_matches_onnxruntime(cell, device, request):
    data = keras_style(cell)
    for batch in batches(request, device):
        x = np.random.default_rng(batch).standard_normal((batch, 12, 5)).astype(np.float32)
        check_all(data, device, {"input": x}, f"keras-style {cell} batch {batch}")


# ---------------------------------------------------------------------------------------------
# ONNX attributes, against onnxruntime and the NumPy reference

ATTRIBUTE_CASES = {
    # name: (cell, rnn_model keyword arguments)
    "lstm-forward": ("lstm", {}),
    "lstm-reverse-lens": ("lstm", dict(direction="reverse", with_lens=True)),
    "lstm-bi-states-lens": ("lstm", dict(direction="bidirectional", with_states=True,
                                         with_lens=True)),
    "lstm-peepholes-clip": ("lstm", dict(peepholes=True, clip=0.7, with_states=True)),
    "lstm-input-forget": ("lstm", dict(input_forget=1, direction="bidirectional")),
    "lstm-no-bias-y-h-only": ("lstm", dict(with_bias=False, outputs=["", "yh"])),
    "gru-forward": ("gru", {}),
    "gru-linear-before-reset": ("gru", dict(linear_before_reset=1, with_lens=True)),
    "gru-bi-states-clip": ("gru", dict(direction="bidirectional", with_states=True, clip=0.5)),
    "gru-reverse-lens": ("gru", dict(direction="reverse", with_lens=True,
                                     linear_before_reset=1)),
}
INPUTS, HIDDEN = 5, 19  # H not a multiple of 8 or 16: the kernels' tails


def _attribute_case(name, batch, layout=0):
    cell, kwargs = ATTRIBUTE_CASES[name]
    kwargs = dict(kwargs)
    data, weights = rnn_model(cell, INPUTS, HIDDEN, layout=layout, opset=14 if layout else 17,
                              **kwargs)
    d = 2 if kwargs.get("direction") == "bidirectional" else 1
    feeds = rnn_feeds(cell, batch, INPUTS, HIDDEN, d=d, layout=layout,
                      lens=kwargs.get("with_lens", False), states=kwargs.get("with_states",
                                                                            False))
    attrs = {k: kwargs[k] for k in ("clip", "input_forget", "linear_before_reset",
                                    "direction") if k in kwargs}
    want = reference(cell, feeds["x"], weights["w"], weights["r"], weights.get("b"),
                     feeds.get("lens"), feeds.get("h0"), feeds.get("c0"), weights.get("p"),
                     layout=layout, **attrs)
    outputs = kwargs.get("outputs")
    if outputs:
        want = tuple(w for w, o in zip(want, outputs) if o)
    return data, feeds, want


@pytest.mark.parametrize("name", ATTRIBUTE_CASES)
def test_attributes_match_onnxruntime(name, device, request):
    for batch in batches(request, device):
        data, feeds, want = _attribute_case(name, batch)
        ours = onnxruntime(data).run(None, feeds)
        for w, o in zip(want, ours):  # the reference agrees with onnxruntime
            np.testing.assert_allclose(w, o, **TOL)
        check_all(data, device, feeds, f"{name} batch {batch}", want=ours)


@pytest.mark.parametrize("name", ("lstm-bi-states-lens", "lstm-peepholes-clip",
                                  "gru-bi-states-clip", "gru-reverse-lens"))
def test_layout_1_matches_numpy_reference(name, device, request):
    """Batch-major X [B, T, I], states [B, D, H], Y [B, T, D, H] (opset 14's layout = 1;
    onnxruntime refuses it, so the NumPy reference above is the ground truth)."""
    for batch in batches(request, device):
        data, feeds, want = _attribute_case(name, batch, layout=1)
        check_all(data, device, feeds, f"{name} layout 1 batch {batch}", want=want)


# ---------------------------------------------------------------------------------------------
# the DeepJet-sized tagger (the benchmark's network)

@pytest.mark.parametrize("exporter", ("legacy", "dynamo"))
def test_deepjet_like_matches_onnxruntime(exporter, device, request):
    data = RM.deepjet(exporter=exporter)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert {"LSTM", "Conv"} <= ops
    session = onnxruntime(data)
    model = offload.load(data, device=device)
    for batch in batches(request, device):
        feeds = RM.make_inputs(batch, np.random.default_rng(batch))
        np.testing.assert_allclose(model(feeds), session.run(None, feeds)[0],
                                   err_msg=f"DeepJet-like ({exporter}) batch {batch}", **TOL)


# ---------------------------------------------------------------------------------------------
# 1-D windows

CONV1D = {
    "kernel3-pad1": lambda: torch.nn.Sequential(torch.nn.Conv1d(6, 16, 3, padding=1),
                                                torch.nn.ReLU(), torch.nn.Conv1d(16, 8, 1)),
    "stride-dilation-groups": lambda: torch.nn.Sequential(
        torch.nn.Conv1d(6, 12, 5, stride=2, dilation=2, padding=3, groups=3),
        torch.nn.MaxPool1d(3, 2, 1)),
    "avgpool-global": lambda: torch.nn.Sequential(
        torch.nn.Conv1d(6, 12, 3), torch.nn.AvgPool1d(3, 2, 1, count_include_pad=False),
        torch.nn.AdaptiveAvgPool1d(1)),
    "same-ceil": lambda: torch.nn.Sequential(torch.nn.Conv1d(6, 12, 4, padding="same"),
                                             torch.nn.AvgPool1d(2, ceil_mode=True),
                                             torch.nn.MaxPool1d(2, ceil_mode=True)),
}


@pytest.mark.parametrize("name", CONV1D)
def test_1d_windows_match_onnxruntime(name, device, request):
    module = RM.seeded(CONV1D[name](), 4)
    data = RM.export(module, (torch.randn(2, 6, 25),), ["x"], ["y"], "legacy")
    assert onnx.load_from_string(data).graph.node[0].op_type == "Conv"
    for batch in batches(request, device):
        x = np.random.default_rng(batch).standard_normal((batch, 6, 25)).astype(np.float32)
        check_all(data, device, {"x": x}, f"{name} batch {batch}")


@pytest.mark.parametrize("auto_pad", ("SAME_UPPER", "SAME_LOWER", "VALID"))
def test_1d_auto_pad_matches_onnxruntime(auto_pad, device):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=auto_pad, strides=[2],
                              name="conv1d"),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2], auto_pad=auto_pad,
                              name="pool1d")]
    graph = helper.make_graph(nodes, "auto_pad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", 3, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["N", 4, "L"])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((3, 3, 11)).astype(np.float32)
    check_all(model.SerializeToString(), device, {"x": x}, auto_pad)


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_sequence_lens_out_of_range(cell, device):
    """cpu: a ShapeError naming the node and the sizes. Kernel devices keep run-time lengths on
    the device (CUDA plans are captured graphs, no host read per call): the rows with a bad
    length are NaN, the others right, nothing is read outside the tensors."""
    data, weights = rnn_model(cell, INPUTS, HIDDEN, with_lens=True)
    model = offload.load(data, device=device)
    feeds = rnn_feeds(cell, 3, INPUTS, HIDDEN, lens=True)
    for lens, message in (([7, 8, 2], r"length 8 .*time axis of X has 7 steps"),
                          ([7, -1, 2], r"a negative length -1")):
        feeds["lens"] = np.array(lens, np.int32)
        if device.kind == "cpu":
            with pytest.raises(offload.ShapeError, match=rf"{cell.upper()} node '{cell}_node': "
                                                         rf"sequence_lens has {message}"):
                model(feeds)
            continue
        got = model(feeds)
        good = dict(feeds, lens=np.array([7, 0, 2], np.int32))
        want = reference(cell, good["x"], weights["w"], weights["r"], weights["b"],
                         good["lens"])
        for g, w in zip(got, want):
            assert np.isnan(g[..., 1, :]).all()
            np.testing.assert_allclose(g[..., [0, 2], :], w[..., [0, 2], :], **TOL)
    feeds["lens"] = np.array([7, 0, 2], np.int32)  # still usable afterwards
    model(feeds)


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_constant_sequence_lens_are_checked_at_load(cell):
    data, _ = rnn_model(cell, INPUTS, HIDDEN)
    model = onnx.load_from_string(data)
    model.graph.initializer.append(numpy_helper.from_array(np.array([3, 9], np.int32), "lens"))
    node = model.graph.node[0]
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = "lens"
    with pytest.raises(offload.ShapeError, match=rf"{cell.upper()} node '{cell}_node': "
                                                 r"sequence_lens has length 9 .* 7 steps"):
        offload.load(model.SerializeToString())


def _edited(cell, **changes):
    data, _ = rnn_model(cell, INPUTS, HIDDEN)
    model = onnx.load_from_string(data)
    node = model.graph.node[0]
    for key, value in changes.items():
        for a in list(node.attribute):
            if a.name == key:
                node.attribute.remove(a)
        if value is not None:
            node.attribute.append(helper.make_attribute(key, value))
    for k, out in enumerate(model.graph.output):  # free axes: ONNX shape inference lets it by
        rank = len(out.type.tensor_type.shape.dim)
        model.graph.output[k].CopyFrom(helper.make_tensor_value_info(
            out.name, TensorProto.FLOAT, [f"a{i}" for i in range(rank)]))
    return model.SerializeToString()


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_hidden_size_mismatch_is_a_typed_error(cell):
    with pytest.raises(offload.ModelFormatError,
                       match=rf"{cell.upper()} node '{cell}_node'.*input [WR] has shape "
                             rf"\[1, {(4 if cell == 'lstm' else 3) * HIDDEN}.*hidden_size 12"):
        offload.load(_edited(cell, hidden_size=12))


def test_direction_and_activations_are_checked():
    with pytest.raises(offload.ModelFormatError, match=r"node 'lstm_node'.*direction is "
                                                       r"'sideways'"):
        offload.load(_edited("lstm", direction="sideways"))
    with pytest.raises(offload.UnsupportedOpError,
                       match=r"LSTM \(node 'lstm_node'\): attribute activations "
                             r"\['Relu', 'Tanh', 'Tanh'\]"):
        offload.load(_edited("lstm", activations=["Relu", "Tanh", "Tanh"]))
    # the defaults spelled out are accepted
    offload.load(_edited("gru", activations=["Sigmoid", "Tanh"]))
