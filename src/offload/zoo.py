"""Reference models, built locally as ONNX graphs with seeded weights.

Nothing is downloaded: every model is assembled node by node with
:mod:`onnx.helper` and filled with weights drawn from
``numpy.random.default_rng(seed)``, so the same ``(name, seed)`` always gives
identical weights.

All models share the same conventions:

* opset 17, IR version 8 (loadable by onnxruntime 1.17 and newer);
* float32 everywhere;
* one input named ``"input"`` and one output named ``"output"``, with the
  batch axis a symbolic dimension ``"N"``;
* every node has a unique, PyTorch/Keras-like name (``"layer1.0.conv1"``);
  initializers are named after their layer (``"layer1.0.bn1.running_var"``).

BatchNormalization running statistics are *calibrated*: while a CNN is built,
a small seeded batch of sample images is pushed through the layers built so
far (plain numpy), and each BN layer gets running_mean = mean + s * N(0, 0.05)
and running_var = s**2 * U(0.8, 1.2), where mean and s**2 are the actual
per-channel mean and variance of its input on that batch -- as in a trained
network.  For unit-scale inputs this is exactly N(0, 0.05) / U(0.8, 1.2).
Without it, randomly initialised convolutions followed by unit running
statistics shrink the signal layer by layer until the output no longer depends
on the input.

Public API: :data:`NAMES`, :func:`build`, :func:`path`, :func:`input_shape`,
:func:`output_shape`, :func:`sample_input`, :func:`describe`.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "NAMES",
    "OPSET",
    "IR_VERSION",
    "build",
    "path",
    "input_shape",
    "output_shape",
    "sample_input",
    "describe",
    "suggest",
]

NAMES = ("resnet50", "jet_mlp", "hcal_mlp", "jet_cnn")

OPSET = 17
IR_VERSION = 8
BATCH_DIM = "N"
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# Per model: input and output shape without the batch axis, parameter count
# (trainable parameters as PyTorch/Keras count them: BN running statistics
# and the Dropout ratio excluded), one-line summary.
_SPECS = {
    "resnet50": dict(
        inp=(3, 224, 224),
        out=(1000,),
        params=25_557_032,
        summary="torchvision ResNet-50 v1.5 (Conv/BN/Relu, bottlenecks 3-4-6-3), logits",
    ),
    "jet_mlp": dict(
        inp=(16,),
        out=(5,),
        params=4_389,
        summary="hls4ml jet-tagging MLP 16-64-32-32-5, ReLU, Gemm(transB=1), softmax",
    ),
    "hcal_mlp": dict(
        inp=(47,),
        out=(1,),
        params=36_135,
        summary="CMS HCAL FACILE regression MLP: BN(47)-200-100-50-20-10-5-1, MatMul+Add",
    ),
    "jet_cnn": dict(
        inp=(1, 40, 40),
        out=(5,),
        params=65_653,
        summary="jet-image CNN: conv3x3 16-32-32 with pools, dense 64, dropout, softmax",
    ),
}

# Calibration batch sizes for the BN running statistics (see module doc).
_CALIB_BATCH = {"resnet50": 2, "jet_cnn": 64}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(
            f"unknown zoo model {name!r}; known models: {', '.join(NAMES)}"
        )
    return name


def _check_batch(batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)


# --------------------------------------------------------------------------
# numpy reference ops, used only for BN calibration while building
# --------------------------------------------------------------------------


def _np_conv(a: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int,
             pad: int) -> np.ndarray:
    if pad:
        a = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    if kh == kw == 1:
        a = a[:, :, ::stride, ::stride]
        out = np.tensordot(w[:, :, 0, 0], a, axes=([1], [1])).transpose(1, 0, 2, 3)
    else:
        win = sliding_window_view(a, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
        out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if b is not None:
        out = out + b[None, :, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def _np_pool(a: np.ndarray, k: int, stride: int, pad: int, mode: str) -> np.ndarray:
    if pad:
        a = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    win = sliding_window_view(a, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    out = win.max(axis=(4, 5)) if mode == "max" else win.mean(axis=(4, 5))
    return np.ascontiguousarray(out, dtype=np.float32)


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------
# Graph assembly helper
# --------------------------------------------------------------------------


class _V:
    """A graph tensor plus, while calibrating, its value on the calibration batch."""

    __slots__ = ("name", "act")

    def __init__(self, name: str, act: np.ndarray | None = None):
        self.name = name
        self.act = act


class _GraphBuilder:
    """Collects nodes and initializers; names outputs after their node."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = {INPUT_NAME}

    # -- tensors ----------------------------------------------------------
    def weight(self, name: str, array) -> str:
        if name in self._tensor_names:
            raise AssertionError(f"duplicate tensor name {name!r}")
        self._tensor_names.add(name)
        arr = np.array(array, dtype=np.float32, order="C")  # keeps 0-d scalars 0-d
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    # -- nodes ------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, output: str | None = None,
             **attrs) -> str:
        if name in self._node_names:
            raise AssertionError(f"duplicate node name {name!r}")
        self._node_names.add(name)
        out = output if output is not None else f"{name}.out"
        if out in self._tensor_names:
            raise AssertionError(f"duplicate tensor name {out!r}")
        self._tensor_names.add(out)
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # -- layers (with calibration values carried along) -------------------
    def conv(self, name: str, x: _V, w: np.ndarray, b: np.ndarray | None = None,
             stride: int = 1, pad: int = 0) -> _V:
        kh, kw = w.shape[2:]
        inputs = [x.name, self.weight(f"{name}.weight", w)]
        if b is not None:
            inputs.append(self.weight(f"{name}.bias", b))
        out = self.node("Conv", inputs, name, dilations=[1, 1], group=1,
                        kernel_shape=[kh, kw], pads=[pad] * 4, strides=[stride, stride])
        act = None if x.act is None else _np_conv(
            x.act, w.astype(np.float32), None if b is None else b.astype(np.float32),
            stride, pad)
        return _V(out, act)

    def batchnorm(self, name: str, x: _V, channels: int, gamma_range=(0.5, 1.0)) -> _V:
        """BatchNormalization; running statistics calibrated on ``x.act`` if
        present, else drawn for a unit-scale input (mean 0, var 1)."""
        rng = self.rng
        if x.act is None:
            in_mean, in_var = np.zeros(channels), np.ones(channels)
        else:
            axes = (0,) + tuple(range(2, x.act.ndim))
            a64 = x.act.astype(np.float64)
            in_mean, in_var = a64.mean(axis=axes), a64.var(axis=axes)
        in_var = np.maximum(in_var, 1e-4)
        gamma = rng.uniform(*gamma_range, size=channels)
        beta = rng.normal(0.0, 0.05, size=channels)
        mean = in_mean + rng.normal(0.0, 0.05, size=channels) * np.sqrt(in_var)
        var = rng.uniform(0.8, 1.2, size=channels) * in_var
        eps = 1e-5
        inputs = [
            x.name,
            self.weight(f"{name}.weight", gamma),
            self.weight(f"{name}.bias", beta),
            self.weight(f"{name}.running_mean", mean),
            self.weight(f"{name}.running_var", var),
        ]
        out = self.node("BatchNormalization", inputs, name, epsilon=eps, momentum=0.9)
        act = None
        if x.act is not None:
            scale = gamma / np.sqrt(var + eps)
            nd = x.act.ndim
            act = (x.act * _channel_view(scale, nd).astype(np.float32)
                   + _channel_view(beta - mean * scale, nd).astype(np.float32))
        return _V(out, act)

    def relu(self, name: str, x: _V) -> _V:
        return _V(self.node("Relu", [x.name], name),
                  None if x.act is None else np.maximum(x.act, 0.0))

    def add(self, name: str, x: _V, y: _V) -> _V:
        act = None if x.act is None or y.act is None else x.act + y.act
        return _V(self.node("Add", [x.name, y.name], name), act)

    def maxpool(self, name: str, x: _V, k: int, stride: int, pad: int = 0) -> _V:
        out = self.node("MaxPool", [x.name], name, ceil_mode=0, dilations=[1, 1],
                        kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])
        return _V(out, None if x.act is None else _np_pool(x.act, k, stride, pad, "max"))

    def avgpool(self, name: str, x: _V, k: int, stride: int) -> _V:
        out = self.node("AveragePool", [x.name], name, ceil_mode=0, count_include_pad=0,
                        kernel_shape=[k, k], pads=[0] * 4, strides=[stride, stride])
        return _V(out, None if x.act is None else _np_pool(x.act, k, stride, 0, "avg"))

    def gemm(self, name: str, x: _V, w: np.ndarray, b: np.ndarray,
             output: str | None = None) -> _V:
        """PyTorch-style Linear: w has shape [out, in], Gemm(transB=1).
        Nothing after a Gemm needs calibration, so no value is carried."""
        inputs = [x.name, self.weight(f"{name}.weight", w), self.weight(f"{name}.bias", b)]
        return _V(self.node("Gemm", inputs, name, output, alpha=1.0, beta=1.0, transB=1))

    # -- finish -----------------------------------------------------------
    def model(self, graph_name: str, in_shape: tuple, out_shape: tuple,
              doc: str) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info(
            INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *in_shape])
        out = helper.make_tensor_value_info(
            OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *out_shape])
        graph = helper.make_graph(
            self.nodes, graph_name, [inp], [out], initializer=self.initializers,
            doc_string=doc,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="offload.zoo",
            producer_version="1",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        return model


# --------------------------------------------------------------------------
# Weight initialisers (PyTorch / Keras defaults)
# --------------------------------------------------------------------------


def _kaiming_normal_fan_out(rng, shape) -> np.ndarray:
    """torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
    fan_out = shape[0] * int(np.prod(shape[2:]))
    std = math.sqrt(2.0 / fan_out)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _torch_default(rng, shape, bias: bool = True):
    """torch default for Linear/Conv: kaiming_uniform(a=sqrt(5)), i.e. weight and
    bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = int(np.prod(shape[1:]))
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    b = rng.uniform(-bound, bound, size=shape[0]).astype(np.float32) if bias else None
    return w, b


def _glorot_uniform(rng, fan_in: int, fan_out: int) -> np.ndarray:
    """Keras default kernel initializer; kernel shape [in, out]."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


# --------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------


def _build_resnet50(g: _GraphBuilder, x: _V) -> None:
    rng = g.rng
    x = g.conv("conv1", x, _kaiming_normal_fan_out(rng, (64, 3, 7, 7)), stride=2, pad=3)
    x = g.batchnorm("bn1", x, 64)
    x = g.relu("relu", x)
    x = g.maxpool("maxpool", x, 3, 2, pad=1)

    in_ch = 64
    expansion = 4
    for stage, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            s = stride if i == 0 else 1
            out_ch = width * expansion
            y = g.conv(f"{p}.conv1", x, _kaiming_normal_fan_out(rng, (width, in_ch, 1, 1)))
            y = g.batchnorm(f"{p}.bn1", y, width)
            y = g.relu(f"{p}.relu", y)
            # v1.5: the stride sits on the 3x3 convolution.
            y = g.conv(f"{p}.conv2", y, _kaiming_normal_fan_out(rng, (width, width, 3, 3)),
                       stride=s, pad=1)
            y = g.batchnorm(f"{p}.bn2", y, width)
            y = g.relu(f"{p}.relu_1", y)
            y = g.conv(f"{p}.conv3", y, _kaiming_normal_fan_out(rng, (out_ch, width, 1, 1)))
            y = g.batchnorm(f"{p}.bn3", y, out_ch, gamma_range=(0.1, 0.3))
            if i == 0:  # s != 1 or in_ch != out_ch: true for every first block
                identity = g.conv(f"{p}.downsample.0", x,
                                  _kaiming_normal_fan_out(rng, (out_ch, in_ch, 1, 1)),
                                  stride=s)
                identity = g.batchnorm(f"{p}.downsample.1", identity, out_ch)
            else:
                identity = x
            x = g.relu(f"{p}.relu_2", g.add(f"{p}.add", y, identity))
            in_ch = out_ch

    x = _V(g.node("GlobalAveragePool", [x.name], "avgpool"))
    x = _V(g.node("Flatten", [x.name], "flatten", axis=1))
    w = rng.normal(0.0, 0.01, size=(1000, 2048))
    b = 0.01 * rng.standard_normal(1000)
    g.gemm("fc", x, w, b, output=OUTPUT_NAME)


def _build_jet_mlp(g: _GraphBuilder, x: _V) -> None:
    rng = g.rng
    sizes = [16, 64, 32, 32, 5]
    n = len(sizes) - 1
    for i in range(n):
        w, b = _torch_default(rng, (sizes[i + 1], sizes[i]))
        x = g.gemm(f"fc{i + 1}", x, w, b)
        if i < n - 1:
            x = g.relu(f"relu{i + 1}", x)
    g.node("Softmax", [x.name], "softmax", OUTPUT_NAME, axis=-1)


def _build_hcal_mlp(g: _GraphBuilder, x: _V) -> None:
    rng = g.rng
    # Inputs are standardised features (sample_input: standard normal), so the
    # uncalibrated unit-scale running statistics are the right ones here.
    x = g.batchnorm("batch_normalization", x, 47, gamma_range=(0.8, 1.2))
    h = x.name
    sizes = [47, 200, 100, 50, 20, 10, 5, 1]
    n = len(sizes) - 1
    for i in range(n):
        p = f"dense_{i + 1}"
        kernel = _glorot_uniform(rng, sizes[i], sizes[i + 1])
        # Keras initialises biases to zero; small seeded values keep the Add
        # numerically meaningful, as in a trained network.
        bias = rng.uniform(-0.05, 0.05, size=sizes[i + 1])
        h = g.node("MatMul", [h, g.weight(f"{p}.kernel", kernel)], f"{p}.matmul")
        last = i == n - 1
        h = g.node("Add", [h, g.weight(f"{p}.bias", bias)], f"{p}.bias_add",
                   OUTPUT_NAME if last else None)
        if not last:
            h = g.node("Relu", [h], f"{p}.relu")


def _build_jet_cnn(g: _GraphBuilder, x: _V) -> None:
    rng = g.rng
    w, _ = _torch_default(rng, (16, 1, 3, 3), bias=False)
    x = g.conv("conv1", x, w, pad=1)
    x = g.batchnorm("bn1", x, 16)
    x = g.relu("relu1", x)
    x = g.maxpool("pool1", x, 2, 2)
    x = g.conv("conv2", x, *_torch_default(rng, (32, 16, 3, 3)), pad=1)
    x = g.relu("relu2", x)
    x = g.maxpool("pool2", x, 2, 2)
    x = g.conv("conv3", x, *_torch_default(rng, (32, 32, 3, 3)), pad=1)
    x = g.relu("relu3", x)
    x = g.avgpool("pool3", x, 2, 2)
    x = _V(g.node("Flatten", [x.name], "flatten", axis=1))
    x = g.gemm("fc1", x, *_torch_default(rng, (64, 32 * 5 * 5)))
    x = g.relu("relu4", x)
    ratio = g.weight("dropout.ratio", np.float32(0.1))
    x = _V(g.node("Dropout", [x.name, ratio], "dropout"))
    x = g.gemm("fc2", x, *_torch_default(rng, (5, 64)))
    g.node("Softmax", [x.name], "softmax", OUTPUT_NAME, axis=-1)


_BUILDERS = {
    "resnet50": _build_resnet50,
    "jet_mlp": _build_jet_mlp,
    "hcal_mlp": _build_hcal_mlp,
    "jet_cnn": _build_jet_cnn,
}


# --------------------------------------------------------------------------
# Sample inputs
# --------------------------------------------------------------------------


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation matrix [n_out, n_in] (align-corners)."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _smooth_images(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Natural-ish images in [0, 1]: a random 8x8 field per channel, upsampled
    bilinearly, plus a little pixel noise."""
    n, c, h, w = shape
    coarse = rng.random((n, c, 8, 8))
    img = np.einsum("hi,ncij,wj->nchw", _interp_matrix(h, 8), coarse,
                    _interp_matrix(w, 8), optimize=True)
    img += rng.normal(0.0, 0.05, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _jet_images(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Jet-like calorimeter images in [0, 1]: three Gaussian energy deposits
    near the centre plus sparse soft hits, each image scaled to max 1."""
    n, c, h, w = shape
    k = 3
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    cy = rng.normal(h / 2, h / 8, size=(n, c, k, 1, 1))
    cx = rng.normal(w / 2, w / 8, size=(n, c, k, 1, 1))
    sigma = rng.uniform(0.8, 3.0, size=(n, c, k, 1, 1))
    amp = rng.uniform(0.1, 1.0, size=(n, c, k, 1, 1))
    img = (amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))).sum(axis=2)
    hits = rng.random((n, c, h, w)) < 0.02
    img += hits * rng.uniform(0.0, 0.3, size=(n, c, h, w))
    img /= img.max(axis=(2, 3), keepdims=True)
    return img.astype(np.float32)


def _sample(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if name == "resnet50":
        return _smooth_images(rng, shape)
    if name == "jet_cnn":
        return _jet_images(rng, shape)
    return rng.standard_normal(shape, dtype=np.float32)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build model ``name`` in memory; weights drawn from ``default_rng(seed)``."""
    _check_name(name)
    x = _V(INPUT_NAME)
    if name in _CALIB_BATCH:
        # Separate stream, so the weights are the same draws as without it.
        calib_rng = np.random.default_rng([int(seed), 0xCA1B])
        x.act = _sample(name, input_shape(name, _CALIB_BATCH[name]), calib_rng)
    g = _GraphBuilder(np.random.default_rng(seed))
    _BUILDERS[name](g, x)
    spec = _SPECS[name]
    model = g.model(name, spec["inp"], spec["out"], describe(name))
    helper.set_model_props(model, {"offload.zoo.name": name, "offload.zoo.seed": str(seed)})
    return model


def _default_cache_dir() -> pathlib.Path:
    env = os.environ.get("OFFLOAD_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "offload" / "zoo"


def path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of ``<cache_dir>/<name>.onnx`` (seed 0), writing it first if absent.

    ``cache_dir`` defaults to ``$OFFLOAD_CACHE`` or ``~/.cache/offload/zoo``.
    The file is written atomically (temporary file in the same folder, then
    :func:`os.replace`), so concurrent callers never see a partial file.  An
    existing file is returned as is, without rebuilding.
    """
    _check_name(name)
    folder = (pathlib.Path(cache_dir).expanduser() if cache_dir is not None
              else _default_cache_dir())
    target = folder / f"{name}.onnx"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    data = build(name, seed=0).SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".onnx.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def input_shape(name: str, batch: int) -> tuple:
    """Concrete input shape of ``name`` for ``batch`` samples."""
    _check_name(name)
    return (_check_batch(batch), *_SPECS[name]["inp"])


def output_shape(name: str, batch: int) -> tuple:
    """Concrete output shape of ``name`` for ``batch`` samples."""
    _check_name(name)
    return (_check_batch(batch), *_SPECS[name]["out"])


def sample_input(name: str, batch: int, seed: int = 0) -> np.ndarray:
    """A float32 batch of ``input_shape(name, batch)``.

    Standard normal features for the MLPs; images in [0, 1] for the CNNs
    (smooth random fields for resnet50, sparse jet-like deposits for jet_cnn).
    """
    shape = input_shape(name, batch)
    return _sample(name, shape, np.random.default_rng(seed))


def suggest(name: str) -> list[str]:
    """The zoo names close to a mistyped ``name`` ('jet_mpl' -> ['jet_mlp']), best first; none
    for what looks like a file path (a folder or an .onnx suffix)."""
    import difflib
    text = str(name)
    if os.sep in text or "/" in text or text.lower().endswith(".onnx"):
        return []
    return difflib.get_close_matches(text.lower(), NAMES, n=3, cutoff=0.6)


def describe(name: str) -> str:
    """One-line summary of model ``name``."""
    _check_name(name)
    spec = _SPECS[name]

    def dims(s):
        return ",".join([BATCH_DIM, *map(str, s)])

    return (f"{name}: {spec['summary']}; input [{dims(spec['inp'])}] -> "
            f"output [{dims(spec['out'])}] float32, {spec['params']:,} params, "
            f"opset {OPSET}")
