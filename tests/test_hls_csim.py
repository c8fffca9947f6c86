"""The HLS kernels in kernels/hls/, compiled with g++ against Xilinx's Apache-2.0 ap_fixed.h
(C-simulation), are bit-exact with offload.fpga.quant: np.array_equal on raw integers."""

from __future__ import annotations

import concurrent.futures
import itertools
import time

import numpy as np
import pytest

from offload.fpga import hls_csim, quant
from offload.errors import KernelBuildError, ShapeError

pytestmark = pytest.mark.skipif(hls_csim.compiler() is None,
                                reason="no C++ compiler (g++ or $CXX) for HLS C-simulation")

KT = hls_csim.KernelTypes

# Kernel type sets: default hls4ml-like, rounding + saturation everywhere, narrow types that
# overflow constantly (wrap), mixed signedness and every remaining mode somewhere.
TYPE_SETS = {
    "fixed16_6": KT("ap_fixed<16,6>", acc="ap_fixed<32,12>"),
    "rnd_sat": KT("ap_fixed<12,4,AP_RND,AP_SAT>", weight="ap_fixed<8,2,AP_RND,AP_SAT>",
                  bias="ap_fixed<10,4,AP_RND,AP_SAT>", acc="ap_fixed<14,6,AP_RND,AP_SAT>",
                  out="ap_fixed<10,3,AP_RND,AP_SAT>"),
    "narrow_wrap": KT("ap_fixed<8,3>", weight="ap_fixed<6,1>", acc="ap_fixed<10,4>",
                      out="ap_fixed<6,2>"),
    "mixed_modes": KT("ap_ufixed<10,4,AP_RND_CONV,AP_SAT>", weight="ap_fixed<7,1,AP_RND_ZERO>",
                      bias="ap_ufixed<9,3>", acc="ap_fixed<13,5,AP_TRN_ZERO,AP_SAT_SYM>",
                      out="ap_fixed<9,4,AP_RND_INF,AP_SAT_ZERO>"),
    "wide": KT("ap_fixed<18,8,AP_RND_MIN_INF>", weight="ap_fixed<18,2>", bias="ap_fixed<24,10>",
               acc="ap_fixed<40,16,AP_RND,AP_SAT>", out="ap_fixed<20,8,AP_RND,AP_SAT>"),
}


@pytest.fixture(scope="module")
def libs():
    """Compile all type sets in parallel (a few seconds each), then load them."""
    with concurrent.futures.ThreadPoolExecutor(len(TYPE_SETS)) as ex:
        list(ex.map(hls_csim.build, TYPE_SETS.values()))
    return {name: hls_csim.load(t) for name, t in TYPE_SETS.items()}


def _rand_raw(rng, t: quant.FixedType, shape):
    return rng.integers(t.raw_min, t.raw_max + 1, size=shape, dtype=np.int64)


# ---------------------------------------------------------------------------
# conversion probe: every Q x O mode on several targets, straight from ap_fixed.h
# ---------------------------------------------------------------------------

PROBE_SHAPES = [(8, 3, True), (6, 2, False), (5, 7, True), (6, -1, True), (1, 1, True)]
PROBE_TYPES = [quant.FixedType(w, i, s, q, o) for (w, i, s) in PROBE_SHAPES
               for q in quant.Q_MODES for o in quant.O_MODES]
PROBE_SOURCES = {"fixed": quant.parse("ap_fixed<24,10>"), "ufixed": quant.parse("ap_ufixed<20,6>")}


def _probe_source() -> str:
    lines = ['#include "offload_hls.h"', "template <class T, class S>",
             "static void conv(const long long* x, long long* y, int n) {",
             "  for (int i = 0; i < n; ++i) {",
             "    T v = fx_load<S>((typename fx_info<S>::store_t)x[i]);",
             "    typename fx_info<T>::bits_t b = v.range(fx_info<T>::width - 1, 0);",
             "    y[i] = fx_info<T>::is_signed ? (long long)b.to_int64() : (long long)b.to_uint64();",
             "  }", "}", "template <class T>",
             "static void from_double(const double* x, long long* y, int n) {",
             "  for (int i = 0; i < n; ++i) {",
             "    T v = x[i];",
             "    typename fx_info<T>::bits_t b = v.range(fx_info<T>::width - 1, 0);",
             "    y[i] = fx_info<T>::is_signed ? (long long)b.to_int64() : (long long)b.to_uint64();",
             "  }", "}"]
    for fn, args, body in (
            ("probe_from_double", "const double* x", "from_double<{t}>(x, y, n)"),
            ("probe_from_fixed", "const long long* x",
             "conv<{t}, " + PROBE_SOURCES["fixed"].cpp + " >(x, y, n)"),
            ("probe_from_ufixed", "const long long* x",
             "conv<{t}, " + PROBE_SOURCES["ufixed"].cpp + " >(x, y, n)")):
        lines.append(f'extern "C" int {fn}(int id, {args}, long long* y, int n) {{')
        lines.append("  switch (id) {")
        for i, t in enumerate(PROBE_TYPES):
            lines.append(f"    case {i}: {body.format(t=t.cpp + ' ')}; return 0;")
        lines.append("  }\n  return -1;\n}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    import ctypes
    src = tmp_path_factory.mktemp("probe") / "probe.cpp"
    src.write_text(_probe_source())
    lib = ctypes.CDLL(str(hls_csim.build_library([src], what="ap_fixed probe")))
    vp, ci = ctypes.c_void_p, ctypes.c_int
    for f in ("probe_from_double", "probe_from_fixed", "probe_from_ufixed"):
        getattr(lib, f).argtypes = [ci, vp, vp, ci]
        getattr(lib, f).restype = ci
    return lib


def _double_cases(rng, t: quant.FixedType) -> np.ndarray:
    lsb, lo, hi = t.lsb, t.min, t.max
    span = max(abs(lo), abs(hi)) + lsb
    k = np.arange(-70, 70)
    xs = [
        rng.uniform(-3 * span, 3 * span, 400),
        (k + 0.5) * lsb, k * lsb, (k + 0.25) * lsb, (k + 0.75) * lsb,  # halves and quarters
        (k + 0.5) * lsb + lsb * 2.0 ** -30, (k + 0.5) * lsb - lsb * 2.0 ** -30,
        [lo, hi, lo - lsb / 2, hi + lsb / 2, lo - lsb, hi + lsb, 0.0, -0.0, 1e-300, -1e-300,
         2.0 ** 70, -(2.0 ** 70), 1e20 + 2.0 ** 20, -3e19, 2.0 ** 62 + 2 ** 10, 123456.789],
    ]
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in xs])


def test_probe_from_double_all_modes(probe):
    """quant.quantize == ap_fixed<...>(double) for all 7 Q x 4 O modes on 5 shapes."""
    rng = np.random.default_rng(1)
    bad = []
    for i, t in enumerate(PROBE_TYPES):
        x = _double_cases(rng, t)
        y = np.zeros(x.size, np.int64)
        assert probe.probe_from_double(i, x.ctypes.data, y.ctypes.data, x.size) == 0
        got = quant.quantize(x, t)
        if not np.array_equal(got, y):
            j = np.flatnonzero(got != y)[0]
            bad.append(f"{t}: x={x[j]!r} quant={got[j]} ap_fixed={y[j]}")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("src_name", sorted(PROBE_SOURCES))
def test_probe_fixed_to_fixed_all_modes(probe, src_name):
    """quant.convert == ap_fixed assignment between fixed types for every Q x O mode."""
    src = PROBE_SOURCES[src_name]
    fn = probe.probe_from_fixed if src_name == "fixed" else probe.probe_from_ufixed
    rng = np.random.default_rng(2)
    near = np.arange(-3000, 3000)
    x = np.concatenate([_rand_raw(rng, src, 4000), near, [src.raw_min, src.raw_max]])
    x = np.clip(x, src.raw_min, src.raw_max).astype(np.int64)
    bad = []
    for i, t in enumerate(PROBE_TYPES):
        y = np.zeros(x.size, np.int64)
        assert fn(i, x.ctypes.data, y.ctypes.data, x.size) == 0
        got = quant.convert(x, src.frac, t)
        if not np.array_equal(got, y):
            j = np.flatnonzero(got != y)[0]
            bad.append(f"{src} -> {t}: raw={x[j]} quant={got[j]} ap_fixed={y[j]}")
    assert not bad, "\n".join(bad[:20])


# ---------------------------------------------------------------------------
# the kernels, random inputs over the full raw range (overflow included)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TYPE_SETS))
@pytest.mark.parametrize("relu", [False, True])
def test_dense_bit_exact(libs, name, relu):
    t = TYPE_SETS[name]
    rng = np.random.default_rng(10)
    for n, k, m in [(1, 1, 1), (5, 16, 64), (3, 64, 7), (2, 200, 3)]:
        x, w = _rand_raw(rng, t.data, (n, k)), _rand_raw(rng, t.weight, (m, k))
        b = _rand_raw(rng, t.bias, m)
        got = libs[name].dense(x, w, b, relu)
        want = quant.dense(x, t.data, w, t.weight, b, t.bias, t.acc, t.out, relu)
        assert got.shape == (n, m)
        assert np.array_equal(got, want), f"{name} {n}x{k}->{m}: {np.sum(got != want)} differ"


@pytest.mark.parametrize("name", sorted(TYPE_SETS))
@pytest.mark.parametrize("pad", [0, 1])
def test_conv2d_bit_exact(libs, name, pad):
    t = TYPE_SETS[name]
    rng = np.random.default_rng(11)
    for (n, c, h, wd), (o, kh, kw) in [((2, 3, 7, 6), (4, 3, 3)), ((1, 1, 5, 5), (2, 1, 1)),
                                       ((2, 4, 4, 9), (3, 2, 3))]:
        x, w = _rand_raw(rng, t.data, (n, c, h, wd)), _rand_raw(rng, t.weight, (o, c, kh, kw))
        b = _rand_raw(rng, t.bias, o)
        for relu in (False, True):
            got = libs[name].conv2d(x, w, b, pad=pad, relu=relu)
            want = quant.conv2d(x, t.data, w, t.weight, b, t.bias, t.acc, t.out, relu, pad)
            assert np.array_equal(got, want), f"{name} {x.shape} * {w.shape}"


@pytest.mark.parametrize("name", sorted(TYPE_SETS))
def test_pool_bit_exact(libs, name):
    t = TYPE_SETS[name]
    rng = np.random.default_rng(12)
    for shape, k in [((2, 3, 8, 8), 2), ((1, 2, 9, 7), 2), ((2, 1, 8, 12), 4), ((1, 1, 3, 3), 1)]:
        x = _rand_raw(rng, t.data, shape)
        assert np.array_equal(libs[name].maxpool2d(x, k), quant.maxpool2d(x, t.data, t.out, k))
        assert np.array_equal(libs[name].avgpool2d(x, k),
                              quant.avgpool2d(x, t.data, t.acc, t.out, k))


def test_overflow_actually_happens(libs):
    """The narrow wrap set overflows its accumulator; the SAT set saturates: the cases the
    bit-exact tests cover are not all in range."""
    rng = np.random.default_rng(13)
    t = TYPE_SETS["rnd_sat"]
    x, w = _rand_raw(rng, t.data, (4, 64)), _rand_raw(rng, t.weight, (8, 64))
    y = libs["rnd_sat"].dense(x, w, None)
    assert np.any(y == t.out.raw_max) and np.any(y == t.out.raw_min)
    t = TYPE_SETS["narrow_wrap"]
    x, w = _rand_raw(rng, t.data, (4, 64)), _rand_raw(rng, t.weight, (8, 64))
    exact = (x[:, None, :] * w[None]).sum(-1) >> (t.data.frac + t.weight.frac - t.acc.frac)
    assert np.any((exact < t.acc.raw_min) | (exact > t.acc.raw_max))


# ---------------------------------------------------------------------------
# zoo models chained through C-simulation
# ---------------------------------------------------------------------------


def _inits(name):
    from onnx import numpy_helper

    from offload import zoo
    return {i.name: numpy_helper.to_array(i) for i in zoo.build(name).graph.initializer}


def test_jet_mlp_chain_bit_exact(libs):
    """jet_mlp fc1..fc3 (+ReLU) and fc4 through C-sim == the quant emulation, bit for bit."""
    from offload import zoo
    t = TYPE_SETS["fixed16_6"]
    p = _inits("jet_mlp")
    x = t.data.quantize(zoo.sample_input("jet_mlp", 64))
    xe = x
    lib = libs["fixed16_6"]
    for i in range(1, 5):
        w, b = t.weight.quantize(p[f"fc{i}.weight"]), t.bias.quantize(p[f"fc{i}.bias"])
        relu = i < 4
        x = lib.dense(x, w, b, relu)
        xe = quant.dense(xe, t.data, w, t.weight, b, t.bias, t.acc, t.out, relu)
        assert np.array_equal(x, xe), f"fc{i}"
    assert np.abs(x).max() > 0


def test_jet_cnn_chain_bit_exact(libs):
    """jet_cnn conv1 (BN folded)/pool1/conv2/pool2/conv3/avgpool3/fc1/fc2 through C-sim ==
    quant, bit for bit."""
    from offload import zoo
    t = TYPE_SETS["fixed16_6"]
    lib = libs["fixed16_6"]
    p = _inits("jet_cnn")
    scale = p["bn1.weight"] / np.sqrt(p["bn1.running_var"] + 1e-5)
    w1 = p["conv1.weight"] * scale[:, None, None, None]
    b1 = p["bn1.bias"] - p["bn1.running_mean"] * scale
    q = lambda a, tt: tt.quantize(a)  # noqa: E731
    x = q(zoo.sample_input("jet_cnn", 2), t.data)
    xe = x
    for wname, w, b in (("conv1", w1, b1), ("conv2", p["conv2.weight"], p["conv2.bias"]),
                        ("conv3", p["conv3.weight"], p["conv3.bias"])):
        wq, bq = q(w, t.weight), q(b, t.bias)
        x = lib.conv2d(x, wq, bq, pad=1, relu=True)
        xe = quant.conv2d(xe, t.data, wq, t.weight, bq, t.bias, t.acc, t.out, True, 1)
        assert np.array_equal(x, xe), wname
        if wname == "conv3":
            x, xe = lib.avgpool2d(x, 2), quant.avgpool2d(xe, t.data, t.acc, t.out, 2)
        else:
            x, xe = lib.maxpool2d(x, 2), quant.maxpool2d(xe, t.data, t.out, 2)
        assert np.array_equal(x, xe), f"pool after {wname}"
    assert x.shape == (2, 32, 5, 5)
    x, xe = x.reshape(2, -1), xe.reshape(2, -1)
    for name, relu in (("fc1", True), ("fc2", False)):
        wq, bq = q(p[f"{name}.weight"], t.weight), q(p[f"{name}.bias"], t.bias)
        x = lib.dense(x, wq, bq, relu)
        xe = quant.dense(xe, t.data, wq, t.weight, bq, t.bias, t.acc, t.out, relu)
        assert np.array_equal(x, xe), name


# ---------------------------------------------------------------------------
# the build and call boundary
# ---------------------------------------------------------------------------


def test_library_reports_its_types(libs):
    lib = libs["mixed_modes"]
    assert lib.types == TYPE_SETS["mixed_modes"]
    assert lib.limits["dense_max_in"] >= 800 and lib.limits["pool_max_shift"] == 4


def test_build_is_cached(libs):
    t0 = time.perf_counter()
    path = hls_csim.build(TYPE_SETS["fixed16_6"])
    assert time.perf_counter() - t0 < 1.0
    assert path == libs["fixed16_6"].path and path.is_file()


def test_build_failure_raises_with_log(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text('#include "offload_hls.h"\nthis is not C++;\n')
    with pytest.raises(KernelBuildError) as e:
        hls_csim.build_library([bad], cache=tmp_path)
    assert "bad.cpp" in e.value.log and "error" in e.value.log
    with pytest.raises(KernelBuildError) as e:
        hls_csim.build(KT(acc="ap_fixed<32,12>"), defines={"DENSE_MAX_IN": "nonsense("},
                       cache=tmp_path)
    assert e.value.log


def test_shape_and_range_errors(libs):
    lib = libs["fixed16_6"]
    with pytest.raises(ShapeError):
        lib.dense(np.zeros((2, 3), np.int64), np.zeros((4, 5), np.int64))
    with pytest.raises(ShapeError):  # exceeds the on-chip buffers: refused, not silently skipped
        lib.dense(np.zeros((1, 2000), np.int64), np.zeros((4, 2000), np.int64))
    with pytest.raises(ValueError):  # raw value outside ap_fixed<16,6>
        lib.dense(np.full((1, 3), 40000), np.zeros((4, 3), np.int64))
    with pytest.raises(ShapeError):
        lib.avgpool2d(np.zeros((1, 1, 6, 6), np.int64), 3)


def test_storage_layout():
    assert quant.parse("ap_fixed<16,6>").storage_dtype == np.int16
    assert quant.parse("ap_fixed<18,8>").storage_dtype == np.int32
    assert quant.parse("ap_ufixed<8,0>").storage_dtype == np.uint8
    t = quant.parse("ap_fixed<12,4>")
    assert t.to_storage([-2048, 2047]).tolist() == [-2048, 2047]


def test_jet_mlp_throughput(libs, record_property):
    """C-sim time per event of jet_mlp's four dense layers (report, not a target)."""
    from offload import zoo
    t = TYPE_SETS["fixed16_6"]
    lib = libs["fixed16_6"]
    p = _inits("jet_mlp")
    layers = [(t.weight.quantize(p[f"fc{i}.weight"]), t.bias.quantize(p[f"fc{i}.bias"]), i < 4)
              for i in range(1, 5)]
    x0 = t.data.quantize(zoo.sample_input("jet_mlp", 4096))
    t0 = time.perf_counter()
    x = x0
    for w, b, relu in layers:
        x = lib.dense(x, w, b, relu)
    dt = time.perf_counter() - t0
    per_event_us = dt / len(x0) * 1e6
    record_property("jet_mlp_csim_us_per_event", per_event_us)
    print(f"\njet_mlp C-sim: {per_event_us:.2f} us/event (batch {len(x0)}, "
          f"{len(x0) / dt:.0f} events/s)")
    assert x.shape == (4096, 5)


def test_itertools_sanity():  # the probe table covers every mode pair
    seen = {(t.q, t.o) for t in PROBE_TYPES}
    assert seen == set(itertools.product(quant.Q_MODES, quant.O_MODES))
