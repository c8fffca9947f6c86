"""offload.fpga.quant: ap_fixed<W,I,Q,O> emulation against hand-computed values, the layers against a
float reference within the quantisation step, and the accuracy of jet_mlp in fixed point.

(Bit-exactness against Xilinx's ap_fixed.h itself is in test_hls_csim.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from offload.fpga import quant
from offload.fpga.quant import FixedType, parse

LSB = 1 / 16  # ap_fixed<8,4>: F = 4, range [-8, 7.9375]


def q(x, t):
    return quant.fake_quantize(np.asarray(x, np.float64), t).tolist()


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("ap_fixed<16,6>", FixedType(16, 6)),
    ("ap_fixed< 16 , 6 >", FixedType(16, 6)),
    ("ap_fixed<16,6,AP_RND,AP_SAT>", FixedType(16, 6, True, "AP_RND", "AP_SAT")),
    ("ap_fixed<16,6,AP_RND_CONV>", FixedType(16, 6, True, "AP_RND_CONV", "AP_WRAP")),
    ("ap_fixed<16,6,AP_RND,AP_SAT,0>", FixedType(16, 6, True, "AP_RND", "AP_SAT")),
    ("fixed<16,6,RND,SAT>", FixedType(16, 6, True, "AP_RND", "AP_SAT")),  # hls4ml spelling
    ("ap_ufixed<8,0>", FixedType(8, 0, False)),
    ("ufixed<8,3,RND_ZERO,SAT_SYM>", FixedType(8, 3, False, "AP_RND_ZERO", "AP_SAT_SYM")),
    ("ap_int<8>", FixedType(8, 8, True)),
    ("ap_uint<4>", FixedType(4, 4, False)),
    ("ap_fixed<4,6>", FixedType(4, 6)),
    ("ap_fixed<6,-1>", FixedType(6, -1)),
])
def test_parse(text, want):
    t = parse(text)
    assert t == want
    assert parse(str(t)) == t  # canonical string round-trips
    assert parse(t) is t


def test_str_is_cpp():
    assert str(parse("ap_fixed<16,6>")) == "ap_fixed<16,6>"
    assert parse("fixed<16,6,RND,SAT>").cpp == "ap_fixed<16,6,AP_RND,AP_SAT>"
    assert str(parse("ap_fixed<8,3,AP_TRN,AP_SAT>")) == "ap_fixed<8,3,AP_TRN,AP_SAT>"
    assert str(parse("ap_ufixed<8,3,AP_RND>")) == "ap_ufixed<8,3,AP_RND>"


@pytest.mark.parametrize("bad", ["ap_fixed<16>", "ap_fixed<0,0>", "ap_fixed<16,6,AP_FOO>",
                                 "ap_fixed<16,6,AP_RND,AP_WRAP_SM>", "ap_fixed<16,6,AP_RND,AP_SAT,2>",
                                 "float", "ap_fixed<a,b>", "ap_fixed<70,6>", "ap_int<8,2>"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_ranges_and_storage():
    t = parse("ap_fixed<8,4>")
    assert (t.frac, t.lsb, t.min, t.max, t.raw_min, t.raw_max) == (4, LSB, -8.0, 7.9375, -128, 127)
    u = parse("ap_ufixed<8,4>")
    assert (u.min, u.max, u.raw_min, u.raw_max) == (0.0, 15.9375, 0, 255)
    assert parse("ap_fixed<4,6>").lsb == 4.0 and parse("ap_fixed<4,6>").max == 28.0
    assert [parse(f"ap_fixed<{w},2>").storage_dtype for w in (8, 9, 16, 17, 32, 33)] == [
        np.int8, np.int16, np.int16, np.int32, np.int32, np.int64]


# ---------------------------------------------------------------------------
# quantisation modes (values in LSBs of ap_fixed<8,4>)
# ---------------------------------------------------------------------------

HALVES = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1.7, -1.7, 1.2, -1.2, 0.0]


@pytest.mark.parametrize("mode, want", [
    ("AP_TRN", [0, 1, 2, -1, -2, -3, 1, -2, 1, -2, 0]),        # floor
    ("AP_RND", [1, 2, 3, 0, -1, -2, 2, -2, 1, -1, 0]),         # floor(x + 1/2)
    ("AP_RND_ZERO", [0, 1, 2, 0, -1, -2, 2, -2, 1, -1, 0]),    # half toward zero
    ("AP_RND_MIN_INF", [0, 1, 2, -1, -2, -3, 2, -2, 1, -1, 0]),  # half toward -inf
    ("AP_RND_INF", [1, 2, 3, -1, -2, -3, 2, -2, 1, -1, 0]),    # half away from zero
    ("AP_RND_CONV", [0, 2, 2, 0, -2, -2, 2, -2, 1, -1, 0]),    # half to even
    ("AP_TRN_ZERO", [0, 1, 2, 0, -1, -2, 1, -1, 1, -1, 0]),    # toward zero
])
def test_quantisation_modes(mode, want):
    t = parse(f"ap_fixed<8,4,{mode}>")
    assert quant.quantize(np.array(HALVES) * LSB, t).tolist() == want


def test_trn_is_default_and_floors_negatives():
    t = parse("ap_fixed<8,4>")
    assert q([0.03, -0.03, 0.0624, -0.0001], t) == [0.0, -LSB, 0.0, -LSB]


@pytest.mark.parametrize("mode, want", [
    ("AP_WRAP", [-8.0, -7.0, 7.9375, 7.0, 7.9375, -8.0]),
    ("AP_SAT", [7.9375, 7.9375, -8.0, -8.0, 7.9375, -8.0]),
    ("AP_SAT_SYM", [7.9375, 7.9375, -7.9375, -7.9375, 7.9375, -7.9375]),
    ("AP_SAT_ZERO", [0.0, 0.0, 0.0, 0.0, 7.9375, -8.0]),  # -8.0 is in range
])
def test_overflow_modes(mode, want):
    t = parse(f"ap_fixed<8,4,AP_TRN,{mode}>")
    assert q([8.0, 9.0, -8.0625, -9.0, 7.9375, -8.0], t) == want


def test_round_then_overflow():
    # rounding first, overflow second: 7.99 rounds up to 8.0, which is out of range
    assert q([7.99], "ap_fixed<8,4,AP_RND,AP_SAT>") == [7.9375]
    assert q([7.99], "ap_fixed<8,4,AP_RND,AP_WRAP>") == [-8.0]
    assert q([7.99], "ap_fixed<8,4,AP_TRN,AP_WRAP>") == [7.9375]
    assert q([-8.01], "ap_fixed<8,4,AP_RND,AP_SAT>") == [-8.0]


def test_unsigned():
    assert q([-1.0, 16.0, 3.03], "ap_ufixed<8,4>") == [15.0, 0.0, 3.0]
    assert q([-1.0, 16.0, 3.03], "ap_ufixed<8,4,AP_RND,AP_SAT>") == [0.0, 15.9375, 3.0]
    assert quant.quantize([255 / 16], "ap_ufixed<8,4>").tolist() == [255]


def test_negative_frac_and_all_fraction_types():
    # LSB 4, range [-32, 28]: 30 floors to 28 (in range), 33 floors to 32 and wraps to -32
    assert q([5.0, 6.0, -1.0, 30.0, 33.0], "ap_fixed<4,6>") == [4.0, 4.0, -4.0, 28.0, -32.0]
    assert q([6.0], "ap_fixed<4,6,AP_RND>") == [8.0]
    assert q([0.3, -0.3], "ap_fixed<8,0>") == [0.296875, -0.30078125]  # 76.8 -> 76, -76.8 -> -77 LSB of 2^-8
    assert q([0.25, 1.0], "ap_ufixed<8,0,AP_RND,AP_SAT>") == [0.25, 255 / 256]


def test_large_values_wrap_exactly():
    t = parse("ap_fixed<8,4>")
    # 2^70 + 2^4 is 2^74 + 2^8 LSBs: the low 8 bits are 0; 2^40 + 3 LSB keeps 3
    assert quant.quantize([2.0 ** 70 + 16.0, 2.0 ** 36 + 3 * LSB, -(2.0 ** 36) - LSB],
                          t).tolist() == [0, 3, -1]
    assert quant.quantize([1e30, -1e30], "ap_fixed<8,4,AP_TRN,AP_SAT>").tolist() == [127, -128]


def test_non_finite_rejected():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            quant.quantize([1.0, bad], "ap_fixed<16,6>")


def test_float32_input_and_roundtrip():
    t = parse("ap_fixed<16,6>")
    x = np.float32([1.1, -3.14159, 0.000976])
    raw = t.quantize(x)
    assert raw.dtype == np.int64
    assert np.all(np.abs(t.to_float(raw) - x) < t.lsb)
    assert np.array_equal(t.quantize(t.to_float(raw)), raw)  # representable values are fixed points


def test_convert_between_types():
    src = parse("ap_fixed<16,6>")  # F = 10
    raw = src.quantize([1.53125, -1.53125, 7.96875, -0.01])
    assert parse("ap_fixed<8,4>").convert(raw, src).tolist() == [24, -25, 127, -1]
    assert parse("ap_fixed<8,4,AP_RND_CONV>").convert(raw, src).tolist() == [24, -24, -128, 0]
    assert parse("ap_fixed<8,4,AP_RND,AP_SAT>").convert(raw, src).tolist() == [25, -24, 127, 0]
    # widening is exact
    wide = parse("ap_fixed<32,12>")
    assert np.array_equal(wide.to_float(wide.convert(raw, src)), src.to_float(raw))
    with pytest.raises(ValueError):
        src.from_raw([40000])
    with pytest.raises(TypeError):
        src.from_raw([1.5])


# ---------------------------------------------------------------------------
# layers against a float reference
# ---------------------------------------------------------------------------


def _float_dense(x, w, b, relu):
    y = x @ w.T + b
    return np.maximum(y, 0) if relu else y


@pytest.mark.parametrize("mode, tol_out", [("AP_TRN", 1.0), ("AP_RND", 0.5)])
def test_dense_matches_float_within_one_step(mode, tol_out):
    """Products exact in acc (F_acc >= F_x + F_w) and no overflow: the only error is the final
    conversion, < 1 LSB (TRN) or <= 1/2 LSB (RND) of the output type."""
    rng = np.random.default_rng(0)
    xt, wt, bt = parse("ap_fixed<12,4>"), parse("ap_fixed<10,2>"), parse("ap_fixed<12,4>")
    acc, out = parse("ap_fixed<40,20>"), parse(f"ap_fixed<14,8,{mode},AP_SAT>")
    x, w, b = xt.quantize(rng.normal(0, 1, (50, 30))), wt.quantize(rng.normal(0, 0.3, (20, 30))), \
        bt.quantize(rng.normal(0, 1, 20))
    for relu in (False, True):
        got = out.to_float(quant.dense(x, xt, w, wt, b, bt, acc, out, relu))
        ref = _float_dense(xt.to_float(x), wt.to_float(w), bt.to_float(b), relu)
        assert np.abs(ref).max() < out.max
        err = got - ref
        assert np.abs(err).max() <= tol_out * out.lsb + 1e-12
        if mode == "AP_TRN":
            assert err.max() <= 1e-12  # truncation never rounds up


def test_dense_accumulator_truncation_bound():
    """Products truncated into a narrower accumulator: error < K LSB_acc + 1 LSB_out."""
    rng = np.random.default_rng(1)
    t, acc = parse("ap_fixed<16,6>"), parse("ap_fixed<20,8>")  # F_acc = 12 < 20
    x, w = t.quantize(rng.normal(0, 1, (40, 64))), t.quantize(rng.normal(0, 0.2, (8, 64)))
    b = t.quantize(rng.normal(0, 0.5, 8))
    got = t.to_float(quant.dense(x, t, w, t, b, t, acc, t))
    ref = _float_dense(t.to_float(x), t.to_float(w), t.to_float(b), False)
    assert np.abs(got - ref).max() < 64 * acc.lsb + t.lsb


def test_relu_before_output_conversion():
    """ReLU acts on the accumulator, then the value is converted: with AP_WRAP an accumulator of
    -40 stays 0 (relu first) although -40 wraps to +24 in ap_fixed<8,6>."""
    t, acc, out = parse("ap_fixed<8,6>"), parse("ap_fixed<16,10>"), parse("ap_fixed<8,6>")
    x = t.quantize([[10.0, 10.0]])
    w = t.quantize([[-2.0, -2.0], [2.0, 2.0]])
    y = out.to_float(quant.dense(x, t, w, t, None, t, acc, out, relu=True))
    assert y.tolist() == [[0.0, -24.0]]  # +40 wraps to -24 in ap_fixed<8,6>
    y = out.to_float(quant.dense(x, t, w, t, None, t, acc, out, relu=False))
    assert y.tolist() == [[24.0, -24.0]]


def test_saturating_accumulator_is_order_dependent():
    """AP_SAT saturates at every add (k in order), as the kernel does: +7 +7 -7 in a [-8, 8)
    accumulator gives 7.9375 - 7 = 0.9375, not 7."""
    t, acc = parse("ap_fixed<8,4>"), parse("ap_fixed<8,4,AP_TRN,AP_SAT>")
    x = t.quantize([[7.0, 7.0, 7.0]])
    w = t.quantize([[1.0, 1.0, -1.0]])
    assert t.to_float(quant.dense(x, t, w, t, None, t, acc, t)).tolist() == [[0.9375]]
    wrap = parse("ap_fixed<8,4>")
    assert t.to_float(quant.dense(x, t, w, t, None, t, wrap, t)).tolist() == [[7.0]]


def _float_conv(x, w, b, pad):
    from offload.zoo import _np_conv
    return _np_conv(x.astype(np.float64), w.astype(np.float64), b, 1, pad).astype(np.float64)


@pytest.mark.parametrize("pad", [0, 1])
def test_conv2d_matches_float(pad):
    rng = np.random.default_rng(2)
    t, acc = parse("ap_fixed<12,4>"), parse("ap_fixed<40,16>")
    out = parse("ap_fixed<16,6,AP_RND,AP_SAT>")
    x, w = t.quantize(rng.random((2, 3, 9, 8))), t.quantize(rng.normal(0, 0.3, (5, 3, 3, 3)))
    b = t.quantize(rng.normal(0, 0.1, 5))
    got = out.to_float(quant.conv2d(x, t, w, t, b, t, acc, out, True, pad))
    ref = np.maximum(_float_conv(t.to_float(x), t.to_float(w), t.to_float(b), pad), 0)
    assert got.shape == ref.shape == (2, 5, 9 + 2 * pad - 2, 8 + 2 * pad - 2)
    assert np.abs(got - ref).max() <= out.lsb / 2 + 1e-12
    # a 1x1 conv is a dense layer over channels
    w1 = w[:, :, 1:2, 1:2]
    got1 = quant.conv2d(x, t, w1, t, b, t, acc, out, False)
    d = quant.dense(x.transpose(0, 2, 3, 1).reshape(-1, 3), t, w1[:, :, 0, 0], t, b, t, acc, out)
    assert np.array_equal(got1, d.reshape(2, 9, 8, 5).transpose(0, 3, 1, 2))


def test_pools():
    t = parse("ap_fixed<8,4>")
    x = t.quantize(np.arange(16, dtype=float).reshape(1, 1, 4, 4) / 4 - 2)
    assert t.to_float(quant.maxpool2d(x, t, t)).tolist() == [[[[-0.75, -0.25], [1.25, 1.75]]]]
    acc = parse("ap_fixed<12,6>")
    assert t.to_float(quant.avgpool2d(x, t, acc, t)).tolist() == [[[[-1.375, -0.875],
                                                                     [0.625, 1.125]]]]
    # exact division: a window sum of 1 LSB averages to 1/4 LSB, truncated (TRN) or rounded
    one = np.zeros((1, 1, 2, 2), np.int64)
    one[0, 0, 0, 0] = 3
    assert quant.avgpool2d(one, t, acc, t).item() == 0
    assert quant.avgpool2d(one, t, acc, parse("ap_fixed<8,4,AP_RND>")).item() == 1
    assert quant.avgpool2d(one, t, acc, parse("ap_fixed<10,4>")).item() == 3  # 2 more frac bits
    with pytest.raises(ValueError):
        quant.avgpool2d(x, t, acc, t, k=3)


# ---------------------------------------------------------------------------
# the zoo jet MLP in fixed point against float32
# ---------------------------------------------------------------------------


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def jet_mlp():
    from onnx import numpy_helper

    from offload import zoo
    p = {i.name: numpy_helper.to_array(i) for i in zoo.build("jet_mlp").graph.initializer}
    x = zoo.sample_input("jet_mlp", 2000, seed=1)
    h = x
    for i in range(1, 5):
        h = h @ p[f"fc{i}.weight"].T + p[f"fc{i}.bias"]
        if i < 4:
            h = np.maximum(h, 0)
    return p, x, _softmax(h.astype(np.float64))


def _jet_mlp_fixed(p, x, prec, acc=None):
    t, a = parse(prec), parse(acc or prec)
    r = t.quantize(x)
    for i in range(1, 5):
        r = quant.dense(r, t, t.quantize(p[f"fc{i}.weight"]), t, t.quantize(p[f"fc{i}.bias"]),
                        t, a, t, i < 4)
    return _softmax(t.to_float(r))


# (precision, accumulator, bound on max |softmax - float32 softmax|): measured values are about
# a third of the bounds (see the printed table with -s).
ACCURACY = [
    ("ap_fixed<16,6>", None, 0.01),
    ("ap_fixed<16,6>", "ap_fixed<32,12>", 0.005),
    ("ap_fixed<16,6,AP_RND,AP_SAT>", None, 0.005),
    ("ap_fixed<12,4>", None, 0.03),
    ("ap_fixed<8,3,AP_RND,AP_SAT>", None, 0.1),
]


def test_jet_mlp_accuracy_vs_float32(jet_mlp):
    p, x, ref = jet_mlp
    rows = []
    for prec, acc, bound in ACCURACY:
        s = _jet_mlp_fixed(p, x, prec, acc)
        d = np.abs(s - ref)
        agree = np.mean(s.argmax(1) == ref.argmax(1))
        rows.append(f"{prec:30s} acc {acc or prec:30s} max|d| {d.max():.4f} "
                    f"mean|d| {d.mean():.5f} argmax agree {agree:.1%}")
        assert d.max() < bound, rows[-1]
    print("\njet_mlp softmax vs float32 (2000 events):\n" + "\n".join(rows))
    # more bits, closer: 16 bits beat 12, a wide accumulator beats a 16-bit one
    errs = [np.abs(_jet_mlp_fixed(p, x, pr, a) - ref).mean() for pr, a in
            [("ap_fixed<16,6>", "ap_fixed<32,12>"), ("ap_fixed<16,6>", None),
             ("ap_fixed<12,4>", None)]]
    assert errs[0] < errs[1] < errs[2]
