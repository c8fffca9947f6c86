"""The FPGA device: offload.load(..., precision="ap_fixed<...>") on the CPU emulation and on the
xrt driver, here on ``xrt-emu:0`` (the driver on offload.fpga.pyxrt_emu, an emulation of pyxrt running
the C-simulated HLS kernels). Results are compared with np.array_equal, never a tolerance."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import offload
from offload import zoo
from offload.fpga import fixed_point, hls_csim, pyxrt_emu, quant
from offload.drivers.xrt import KernelStateError, KernelTimeoutError
from offload.errors import DeviceRuntimeError, ShapeError, UnsupportedOpError

EMU = "xrt-emu:0"
P16 = "ap_fixed<16,6>"
needs_emu = pytest.mark.skipif(
    not any(i.spec == EMU and i.available for i in offload.devices()),
    reason="xrt-emu:0 unavailable (no C++ compiler for the HLS C-simulation)")
REAL_CARDS = [i.spec for i in offload.devices() if i.spec.startswith("xrt:") and i.available]
_why_no_card = "; ".join(f"{i.spec}: {i.reason}" for i in offload.devices()
                         if i.spec.startswith("xrt:")) or "no xrt driver"


@pytest.fixture
def emu():
    dev = offload.device(EMU)
    dev.recover()
    card = pyxrt_emu.card(0)
    card.clear_faults()
    dev.reset_counters()
    yield dev
    card.clear_faults()
    dev.timeout_ms = 10_000
    dev.recover()


def _logits(name: str) -> bytes:
    """The zoo model without its final softmax (so fixed-point outputs compare exactly)."""
    m = zoo.build(name)
    last = m.graph.node[-1]
    assert last.op_type == "Softmax"
    del m.graph.node[-1]
    out = m.graph.output[0]
    out.name = last.input[0]
    return m.SerializeToString()


# ---------------------------------------------------------------------------
# the device matrix: every device either runs fixed point bit-exactly or refuses it
# ---------------------------------------------------------------------------


@pytest.mark.fixed_point
def test_jet_mlp_fixed_point_matrix(device):
    x = zoo.sample_input("jet_mlp", 9, seed=3)
    if fixed_point.FAMILY not in device.capabilities.precisions:
        with pytest.raises(UnsupportedOpError) as e:
            offload.load("jet_mlp", device=device, precision=P16)
        assert device.spec in str(e.value) and P16 in str(e.value)
        return
    got = offload.load("jet_mlp", device=device, precision=P16)(x)
    want = offload.load("jet_mlp", device="cpu", precision=P16)(x)
    assert got.dtype == np.float32 and np.array_equal(got, want)


@needs_emu
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_jet_mlp_xrt_emu_bit_exact(emu, batch):
    x = zoo.sample_input("jet_mlp", batch, seed=batch)
    for precision in (P16, "ap_fixed<10,4,AP_RND,AP_SAT>"):
        got = offload.load("jet_mlp", device=EMU, precision=precision)(x)
        want = offload.load("jet_mlp", device="cpu", precision=precision)(x)
        assert np.array_equal(got, want), precision
    logits = _logits("jet_mlp")
    got = offload.load(logits, device=EMU, precision=P16)(x)
    want = offload.load(logits, device="cpu", precision=P16)(x)
    assert np.array_equal(got, want) and np.abs(got).max() > 0
    # the values are those of ap_fixed<16,6>: multiples of 2**-10
    assert np.array_equal(got * 1024, np.round(got * 1024))


@needs_emu
@pytest.mark.parametrize("batch", [1, 3])
def test_jet_cnn_xrt_emu_bit_exact(emu, batch):
    x = zoo.sample_input("jet_cnn", batch, seed=batch)
    logits = _logits("jet_cnn")
    got = offload.load(logits, device=EMU, precision=P16)(x)
    want = offload.load(logits, device="cpu", precision=P16)(x)
    assert np.array_equal(got, want)
    y = offload.load("jet_cnn", device=EMU, precision=P16)(x)
    assert np.array_equal(y, offload.load("jet_cnn", device="cpu", precision=P16)(x))


def test_cpu_emulation_equals_quant_layer_by_layer():
    """The CPU device's fixed-point path is offload.fpga.quant, layer by layer (jet_mlp logits)."""
    from onnx import numpy_helper as nh
    p = {i.name: nh.to_array(i) for i in zoo.build("jet_mlp").graph.initializer}
    t = hls_csim.KernelTypes(P16, acc="ap_fixed<32,12>")
    x = zoo.sample_input("jet_mlp", 50, seed=1)
    raw = t.data.quantize(x)
    for i in range(1, 5):
        raw = quant.dense(raw, t.data, t.weight.quantize(p[f"fc{i}.weight"]), t.weight,
                          t.bias.quantize(p[f"fc{i}.bias"]), t.bias, t.acc, t.out, i < 4)
    got = offload.load(_logits("jet_mlp"), precision=P16)(x)
    assert np.array_equal(got, quant.to_float(raw, t.out).astype(np.float32))


# ---------------------------------------------------------------------------
# precision strings, per-layer overrides
# ---------------------------------------------------------------------------


def test_precision_defaults_and_parts():
    p = fixed_point.parse(P16)
    assert str(p.default["accum"]) == "ap_fixed<32,12>"
    assert p.default["weight"] == p.default["result"] == p.default["data"] == quant.parse(P16)
    p = fixed_point.parse({"default": {"data": "ap_fixed<12,4>", "weight": "ap_fixed<8,2>"},
                           "fc2": {"acc": "ap_fixed<20,8>"}})
    assert str(p.default["accum"]) == "ap_fixed<24,8>" and str(p.default["weight"]) == \
        "ap_fixed<8,2>"
    assert str(p.layers["fc2"]["accum"]) == "ap_fixed<20,8>"
    assert p.layers["fc2"]["weight"] == p.default["weight"]
    for bad in ({"fc1": P16}, {"default": P16, "fc1": {"bogus": P16}},
                {"default": P16, "fc1": {"data": P16}}, "ap_fixed<16>", "ap_fixed<30,10>"):
        with pytest.raises(offload.PrecisionError):
            fixed_point.parse(bad)


def test_unknown_layer_names_are_listed():
    with pytest.raises(offload.PrecisionError) as e:
        offload.load("jet_mlp", precision={"default": P16, "fc9": "ap_fixed<8,3>"})
    msg = str(e.value)
    assert "fc9" in msg and all(n in msg for n in ("fc1", "fc2", "fc3", "fc4"))


def _override_chain(x, p):
    """jet_mlp logits with fc2 in ap_fixed<12,4>, by the documented rules, through quant."""
    d, o = quant.parse(P16), quant.parse("ap_fixed<12,4>")
    types = [(d, d, d, quant.parse("ap_fixed<32,12>"), d),       # fc1
             (d, o, o, quant.parse("ap_fixed<24,8>"), o),         # fc2: override
             (o, d, d, quant.parse("ap_fixed<32,12>"), d),        # fc3: data = fc2's result
             (d, d, d, quant.parse("ap_fixed<32,12>"), d)]        # fc4
    raw = d.quantize(x)
    for i, (td, tw, tb, ta, to) in enumerate(types, 1):
        raw = quant.dense(raw, td, tw.quantize(p[f"fc{i}.weight"]), tw,
                          tb.quantize(p[f"fc{i}.bias"]), tb, ta, to, i < 4)
    return quant.to_float(raw, types[-1][4]).astype(np.float32)


@pytest.mark.parametrize("dev", ["cpu", pytest.param(EMU, marks=needs_emu)])
def test_per_layer_override_changes_result_as_emulated(dev):
    p = {i.name: numpy_helper.to_array(i) for i in zoo.build("jet_mlp").graph.initializer}
    x = zoo.sample_input("jet_mlp", 64, seed=5)
    logits = _logits("jet_mlp")
    spec = {"default": P16, "fc2": "ap_fixed<12,4>"}
    model = offload.load(logits, device=dev, precision=spec)
    layers = fixed_point.kernel_layers(model.graph)
    assert str(layers[2].types.data) == "ap_fixed<12,4>"  # fc3 reads fc2's result type
    got = model(x)
    uniform = offload.load(logits, device=dev, precision=P16)(x)
    assert not np.array_equal(got, uniform)
    assert np.array_equal(got, _override_chain(x, p))


def test_float_devices_and_unsupported_layers_refuse_at_load():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["g"], name="fc", transB=1),
                           helper.make_node("Tanh", ["g"], ["y"], name="act")],
                          "tanh_mlp", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(UnsupportedOpError) as e:  # tanh is fused into the dense: no kernel
        offload.load(m, precision=P16)
    assert "fc" in str(e.value) and "tanh" in str(e.value)


# ---------------------------------------------------------------------------
# the xrt driver on the emulation: call sequence, errors
# ---------------------------------------------------------------------------


@needs_emu
def test_float_model_on_fpga_is_refused(emu):
    with pytest.raises(UnsupportedOpError) as e:
        offload.load("jet_mlp", device=EMU)
    assert EMU in str(e.value) and "precision" in str(e.value)


@needs_emu
@pytest.mark.parametrize("name,layers,weighted", [("jet_mlp", 4, 4), ("jet_cnn", 8, 5)])
def test_call_sequence_per_batch(emu, name, layers, weighted):
    batch = 1000 if name == "jet_mlp" else 2
    model = offload.load(name, device=EMU, precision=P16)
    x = zoo.sample_input(name, batch)
    model(x)  # first call: plan, weights quantised, written and synced once
    card = pyxrt_emu.card(0)
    weights_syncs = emu.counters["syncs_to_device"] - 1
    assert weights_syncs == 2 * weighted  # weights and bias of each dense/conv, once
    for _ in range(3):
        emu.reset_counters()
        card.reset_counters()
        model(x)
        c = emu.counters
        assert c["runs"] == layers  # one run per layer per batch, the batch loop in the kernel
        assert c["syncs_to_device"] == 1 and c["syncs_from_device"] == 1
        assert c["bytes_to_device"] == x.size * 2  # int16 input
        assert c["bytes_from_device"] == batch * 5 * 2
        assert card.counters["runs"] == layers and card.counters["syncs_to_device"] == 1


@needs_emu
def test_injected_timeout_raises_within_the_timeout(emu):
    model = offload.load("jet_mlp", device=EMU, precision=P16)
    x = zoo.sample_input("jet_mlp", 4)
    want = model(x)
    emu.timeout_ms = 200
    pyxrt_emu.card(0).inject("timeout")
    t0 = time.perf_counter()
    with pytest.raises(KernelTimeoutError, match="within 200 ms"):
        model(x)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(DeviceRuntimeError, match="error state"):  # no silent reuse
        model(x)
    emu.recover()
    assert np.array_equal(model(x), want)


@needs_emu
@pytest.mark.parametrize("fault", ["error", "abort"])
def test_injected_error_state_raises(emu, fault):
    model = offload.load("jet_mlp", device=EMU, precision=P16)
    x = zoo.sample_input("jet_mlp", 4)
    model(x)
    pyxrt_emu.card(0).inject(fault)
    with pytest.raises(KernelStateError, match=f"ERT_CMD_STATE_{fault.upper()}"):
        model(x)


@needs_emu
def test_unsupported_ops_listed_at_plan_time(emu):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "ym"]
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["g"], name="fc", transB=1),
                           helper.make_node("Add", ["g", "g"], ["y"], name="twice"),
                           helper.make_node("Mul", ["g", "g"], ["m"], name="square")],
                          "add_mul", [x], outs, [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    xs = np.ones((2, 4), np.float32)
    offload.load(m, precision=P16)(xs)  # the CPU runs the float ops after the fixed dense
    model = offload.load(m, device=EMU, precision=P16)
    with pytest.raises(UnsupportedOpError) as e:
        model(xs)
    assert {op for op, _ in e.value.ops} == {"add", "mul"}  # all listed, not just the first
    assert "twice" in str(e.value) and "square" in str(e.value) and EMU in str(e.value)


@needs_emu
def test_driver_validates_arguments(emu):
    layer = fixed_point.FixedLayer(hls_csim.KernelTypes(P16), "fc1", "dense")
    bo = pyxrt_emu.bo(emu.handle, 64, pyxrt_emu.bo.normal, 0)
    ok = [bo, bo, bo, bo, 1, 2, 3, 0]
    assert emu._check_args("dense", ok, layer) == ok
    for bad in ([bo, bo, bo, bo, 1.0, 2, 3, 0], [bo, bo, bo, bo, 1, 2, 3, True],
                [bo, bo, bo, "y", 1, 2, 3, 0], [bo, bo, bo, bo, 1 << 40, 2, 3, 0]):
        with pytest.raises(ShapeError):
            emu._check_args("dense", bad, layer)
    with pytest.raises(DeviceRuntimeError):
        emu._check_args("dense", ok[:-1], layer)


# ---------------------------------------------------------------------------
# the emulation itself is strict
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_dense():
    """A dense kernel on the emulated pyxrt surface, used the way 22_verify uses pyxrt."""
    types = hls_csim.KernelTypes(P16)
    path = pyxrt_emu.build_xclbin(types)
    d = pyxrt_emu.device(0)
    xb = pyxrt_emu.xclbin(str(path))
    ctx = pyxrt_emu.hw_context(d, d.register_xclbin(xb))
    return types, d, pyxrt_emu.kernel(ctx, "dense")


def _dense_bos(types, d, k, x, w, b, m):
    bos = []
    for i, arr in enumerate((x, w, b)):
        bo = pyxrt_emu.bo(d, arr.nbytes, pyxrt_emu.bo.normal, k.group_id(i))
        bo.write(arr, 0)
        bos.append(bo)
    y = pyxrt_emu.bo(d, x.shape[0] * m * 2, pyxrt_emu.bo.normal, k.group_id(3))
    return bos + [y]


def test_emulation_missing_sync_gives_stale_data(raw_dense):
    types, d, k = raw_dense
    rng = np.random.default_rng(0)
    n, kk, m = 5, 8, 4
    x = types.data.to_storage(rng.integers(-3000, 3000, (n, kk)))
    w = types.weight.to_storage(rng.integers(-500, 500, (m, kk)))
    b = types.bias.to_storage(rng.integers(-500, 500, m))
    want = hls_csim.load(types).dense(x, w, b, True)
    S = pyxrt_emu.xclBOSyncDirection
    OK = pyxrt_emu.ert_cmd_state.ERT_CMD_STATE_COMPLETED
    xb, wb, bb, yb = _dense_bos(types, d, k, x, w, b, m)
    for bo in (xb, wb, bb):
        bo.sync(S.XCL_BO_SYNC_BO_TO_DEVICE, bo.size(), 0)
    assert k(xb, wb, bb, yb, n, kk, m, 1).wait(1000) == OK
    y_host = np.frombuffer(yb.map(), np.int16).reshape(n, m)
    assert not np.array_equal(y_host, want)  # no sync back yet: the host copy is untouched
    yb.sync(S.XCL_BO_SYNC_BO_FROM_DEVICE, yb.size(), 0)
    assert np.array_equal(y_host, want)
    # new input written on the host but not synced: the kernel still sees the old one
    x2 = types.data.to_storage(rng.integers(-3000, 3000, (n, kk)))
    xb.write(x2, 0)
    assert k(xb, wb, bb, yb, n, kk, m, 1).wait(1000) == OK
    yb.sync(S.XCL_BO_SYNC_BO_FROM_DEVICE)
    assert np.array_equal(y_host, want)
    xb.sync(S.XCL_BO_SYNC_BO_TO_DEVICE)
    k(xb, wb, bb, yb, n, kk, m, 1).wait(1000)
    yb.sync(S.XCL_BO_SYNC_BO_FROM_DEVICE)
    assert np.array_equal(y_host, hls_csim.load(types).dense(x2, w, b, True))
    # a buffer never synced holds stale bytes on the device, not zeros
    fresh = _dense_bos(types, d, k, x, w, b, m)
    k(*fresh, n, kk, m, 0).wait(1000)
    fresh[3].sync(S.XCL_BO_SYNC_BO_FROM_DEVICE)
    assert not np.array_equal(np.frombuffer(fresh[3].map(), np.int16).reshape(n, m),
                              hls_csim.load(types).dense(x, w, b, False))


def test_emulation_rejects_bad_arguments(raw_dense):
    types, d, k = raw_dense
    x = np.zeros((2, 4), np.int16)
    w, b = np.zeros((3, 4), np.int16), np.zeros(3, np.int16)
    xb, wb, bb, yb = _dense_bos(types, d, k, x, w, b, 3)
    other = pyxrt_emu.bo(d, 16, pyxrt_emu.bo.normal, 1)  # DDR[1]; the kernel uses DDR[0]
    E = pyxrt_emu.EmulationError
    with pytest.raises(E, match="group 1"):
        k(other, wb, bb, yb, 2, 4, 3, 0)
    with pytest.raises(E, match="expected a Python int"):
        k(xb, wb, bb, yb, 2.0, 4, 3, 0)
    with pytest.raises(E, match="expected a Python int"):
        k(xb, wb, bb, yb, np.int64(2), 4, 3, 0)
    with pytest.raises(E, match="expected a bo"):
        k(xb, wb, bb, 7, 2, 4, 3, 0)
    with pytest.raises(E, match="expected 8 arguments"):
        k(xb, wb, bb, yb, 2, 4, 3)
    with pytest.raises(E, match="would touch"):  # batch larger than the buffers
        k(xb, wb, bb, yb, 200, 4, 3, 0)
    with pytest.raises(E, match="does not exist"):
        pyxrt_emu.bo(d, 16, pyxrt_emu.bo.normal, 9)
    with pytest.raises(E, match="group_id"):
        k.group_id(4)  # a scalar argument has no memory group
    with pytest.raises(E, match="not in xclbin"):
        pyxrt_emu.kernel(pyxrt_emu.hw_context(d, k._uuid), "softmax")


def test_emulation_never_hangs(raw_dense):
    types, d, k = raw_dense
    xb, wb, bb, yb = _dense_bos(types, d, k, np.zeros((1, 4), np.int16),
                                np.zeros((3, 4), np.int16), np.zeros(3, np.int16), 3)
    pyxrt_emu.card(0).inject("timeout")
    r = k(xb, wb, bb, yb, 1, 4, 3, 0)
    with pytest.raises(pyxrt_emu.EmulationError, match="block forever"):
        r.wait()
    t0 = time.perf_counter()
    assert r.wait(50) == pyxrt_emu.ert_cmd_state.ERT_CMD_STATE_TIMEOUT
    assert 0.04 < time.perf_counter() - t0 < 1.0


def test_kernel_signatures_come_from_the_sources():
    sigs = pyxrt_emu.kernel_signatures()
    assert [a for a, _, _ in sigs["dense"]] == ["x", "w", "b", "y", "batch", "n_in", "n_out",
                                                "relu"]
    assert set(sigs) == {"dense", "conv2d", "maxpool2d", "avgpool2d"}


# ---------------------------------------------------------------------------
# a real card
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_CARDS, reason=f"needs an Alveo card with XRT's pyxrt and "
                    f"$OFFLOAD_XCLBIN: {_why_no_card}")
@pytest.mark.parametrize("name", ["jet_mlp", "jet_cnn"])
def test_real_card_bit_exact(name):
    x = zoo.sample_input(name, 16)
    for spec in REAL_CARDS:
        got = offload.load(name, device=spec, precision=P16)(x)
        assert np.array_equal(got, offload.load(name, device="cpu", precision=P16)(x))


def test_devices_list_names_the_emulation():
    infos = {i.spec: i for i in offload.devices()}
    assert EMU in infos and "emulation" in infos[EMU].name
    assert "xrt:0" in infos
    if not infos["xrt:0"].available:
        assert infos["xrt:0"].reason
    if infos[EMU].available:
        assert offload.device(EMU).emulated and offload.device(EMU).xrt is pyxrt_emu


def test_pickled_errors_keep_their_type():
    import pickle
    e = pickle.loads(pickle.dumps(KernelTimeoutError("x")))
    assert isinstance(e, KernelTimeoutError) and isinstance(e, DeviceRuntimeError)
    _ = onnx  # the onnx helpers above build the small test graphs
