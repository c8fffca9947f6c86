// Row kernels of the transformer taggers for the NumPy CPU device: GELU (and erf), softmax of
// x * scale + bias over the last axis, and layer normalization over the last axis. NumPy needs
// several passes over memory and one thread for each; here each row (or block of elements) is
// done in one pass from cache, with the exponentials as polynomials the compiler vectorises,
// and blocks of rows are shared out over the CPU device's pool (pool.h).
//
// Every entry point checks shapes, dtypes and overlaps before touching memory.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "checks.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using i64 = std::int64_t;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROW_CLONES
#endif
#define ROW_INLINE inline __attribute__((always_inline))

constexpr i64 kParallelElements = 1 << 16;  // less work than this runs on the calling thread
constexpr i64 kBlock = 1 << 12;             // elements per task of the elementwise kernels

using offload::shape_of;

// ``out`` must not overlap ``in`` (it would be read after being written), except as the very
// same array where the kernel allows in place.
template <typename A, typename B>
void check_apart(const char *fn, const char *what, const A &out, const B &in, bool same_ok) {
    auto o0 = reinterpret_cast<std::uintptr_t>(out.data()), o1 = o0 + out.size() * sizeof(float);
    auto i0 = reinterpret_cast<std::uintptr_t>(in.data()), i1 = i0 + in.size() * sizeof(float);
    if (o0 >= o1 || i0 >= i1 || o1 <= i0 || i1 <= o0) return;
    if (same_ok && o0 == i0 && o1 == i1) return;
    throw nb::value_error((std::string(fn) + ": out overlaps " + what +
                           " (it would be read after being written); pass separate arrays")
                              .c_str());
}

// e^x in float32 (2^n * e^f, |f| <= ln2/2, degree-6 Taylor: relative error < 2e-7); inputs
// below -87 give ~0 and NaN stays NaN. Branch-free, so loops of it vectorise.
ROW_INLINE float exp_poly(float x) {
    const float in = x;
    x = x != x ? 0.f : x;  // (NaN converted to an integer below would be undefined)
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504f + magic) - magic;
    float f = x - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    float p = 1.f / 720;
    p = p * f + 1.f / 120;
    p = p * f + 1.f / 24;
    p = p * f + 1.f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    const std::uint32_t bits = (std::uint32_t) ((std::int32_t) n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return in != in ? in : p * scale;
}

// erf(x): Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula the NumPy path uses.
ROW_INLINE float erf_poly(float x) {
    const float a = std::fabs(x);
    const float s = 1.f / (1.f + 0.3275911f * a);
    float p = 1.061405429f;
    p = p * s - 1.453152027f;
    p = p * s + 1.421413741f;
    p = p * s - 0.284496736f;
    p = p * s + 0.254829592f;
    const float r = 1.f - p * s * exp_poly(-a * a);
    return std::copysign(r, x);
}

ROW_CLONES
void gelu_span(const float *x, float *y, i64 n, bool gelu) {
    if (gelu)
        for (i64 i = 0; i < n; ++i) y[i] = 0.5f * x[i] * (1.f + erf_poly(x[i] * 0.70710678118654752f));
    else
        for (i64 i = 0; i < n; ++i) y[i] = erf_poly(x[i]);
}

// fn(first, end) over [0, n) in tasks of ``block`` items on the pool (on the calling thread
// alone below ``parallel_items``).
template <typename Fn> void in_blocks(i64 n, i64 block, bool parallel, Fn fn) {
    if (n <= 0) return;
    offload::parallel_for((n + block - 1) / block, [&](std::int64_t t) {
        fn(t * block, std::min(n, (t + 1) * block));
    }, parallel);
}

// y = gelu(x) = x/2 (1 + erf(x / sqrt 2)), or erf(x) with gelu false; in place allowed.
void gelu(In x, Out y, bool is_gelu) {
    const char *fn = is_gelu ? "gelu" : "erf";
    OFFLOAD_CHECK(x.size() == y.size(), std::string(fn) + ": x " + shape_of(x) + " and out " +
                                    shape_of(y) + " must have the same size");
    check_apart(fn, "x", y, x, true);
    const float *xd = x.data();
    float *yd = y.data();
    const i64 n = (i64) x.size();
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    in_blocks(n, kBlock, n >= kParallelElements,
              [&](i64 a, i64 b) { gelu_span(xd + a, yd + a, b - a, is_gelu); });
}

// Sums and maxima of a row in kLanes independent lanes, so that the compiler vectorises them
// without reassociating one float sum (which it may not do).
constexpr int kLanes = 16;

ROW_INLINE float row_sum(const float *y, i64 n) {
    float acc[kLanes] = {};
    i64 j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += y[j + l];
    float s = 0.f;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    for (; j < n; ++j) s += y[j];
    return s;
}

// The largest value of the row (a NaN in it is not seen here: it makes the row's sum NaN).
ROW_INLINE float row_max(const float *y, i64 n) {
    float acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
    i64 j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > y[j + l] ? acc[l] : y[j + l];
    float mx = -INFINITY;
    for (int l = 0; l < kLanes; ++l) mx = mx > acc[l] ? mx : acc[l];
    for (; j < n; ++j) mx = mx > y[j] ? mx : y[j];
    return mx;
}

// One row: y = softmax(x * scale + b) (b may be null). NaN anywhere gives a NaN row (through
// the sum), as the NumPy path; a row whose every input is -inf gives NaN as well.
ROW_CLONES
void softmax_row(const float *x, const float *b, float scale, float *y, i64 n) {
    if (b)
        for (i64 j = 0; j < n; ++j) y[j] = x[j] * scale + b[j];
    else
        for (i64 j = 0; j < n; ++j) y[j] = x[j] * scale;
    const float mx = row_max(y, n);
    for (i64 j = 0; j < n; ++j) y[j] = exp_poly(y[j] - mx);
    const float inv = 1.f / row_sum(y, n);
    for (i64 j = 0; j < n; ++j) y[j] *= inv;
}

// out[r] = softmax(x[r] * scale + bias[(r / bias_div) % bias_rows]) over the last axis of x
// viewed as [rows, n]; bias (optional) is [bias_rows, n]: the same shape as x (div 1), or
// broadcast over blocks of rows (a key-padding mask [N, 1, 1, P] for scores [N, H, P, P]:
// div H * P). In place allowed.
void softmax_scaled(In x, std::optional<In> bias, float scale, i64 bias_div, Out y) {
    const char *fn = "softmax_scaled";
    OFFLOAD_CHECK(x.ndim() >= 1 && x.size() == y.size(),
          std::string(fn) + ": x " + shape_of(x) + " and out " + shape_of(y) + " must have the same size");
    OFFLOAD_CHECK(std::isfinite(scale), std::string(fn) + ": scale must be finite");
    const i64 n = (i64) x.shape(x.ndim() - 1), rows = n ? (i64) x.size() / n : 0;
    i64 bias_rows = 0;
    if (bias) {
        OFFLOAD_CHECK(bias->ndim() >= 1 && (i64) bias->shape(bias->ndim() - 1) == n,
              std::string(fn) + ": bias " + shape_of(*bias) + " must end in the softmax axis (" +
                  std::to_string(n) + ")");
        bias_rows = n ? (i64) bias->size() / n : 0;
        OFFLOAD_CHECK(bias_div >= 1 && bias_rows >= 1 && rows % bias_div == 0,
              std::string(fn) + ": bias_div " + std::to_string(bias_div) + " must be >= 1 and divide the " +
                  std::to_string(rows) + " rows, and bias must have rows");
        check_apart(fn, "bias", y, *bias, false);
    }
    check_apart(fn, "x", y, x, true);
    if (!rows || !n) return;
    const float *xd = x.data(), *bd = bias ? bias->data() : nullptr;
    float *yd = y.data();
    const i64 per = std::max<i64>(1, kBlock / n);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    in_blocks(rows, per, rows * n >= kParallelElements, [&](i64 a, i64 e) {
        for (i64 r = a; r < e; ++r)
            softmax_row(xd + r * n, bd ? bd + ((r / bias_div) % bias_rows) * n : nullptr, scale,
                        yd + r * n, n);
    });
}

ROW_CLONES
void layernorm_row(const float *x, const float *g, const float *b, float eps, float *y, i64 n) {
    const float mean = row_sum(x, n) / (float) n;
    for (i64 j = 0; j < n; ++j) y[j] = (x[j] - mean) * (x[j] - mean);
    const float inv = 1.f / std::sqrt(row_sum(y, n) / (float) n + eps);
    if (b)
        for (i64 j = 0; j < n; ++j) y[j] = (x[j] - mean) * inv * g[j] + b[j];
    else
        for (i64 j = 0; j < n; ++j) y[j] = (x[j] - mean) * inv * g[j];
}

// y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis of x viewed as [rows, n];
// scale and bias have n values. In place allowed.
void layernorm(In x, In scale, std::optional<In> bias, float eps, Out y) {
    const char *fn = "layernorm";
    OFFLOAD_CHECK(x.ndim() >= 1 && x.size() == y.size(),
          std::string(fn) + ": x " + shape_of(x) + " and out " + shape_of(y) + " must have the same size");
    const i64 n = (i64) x.shape(x.ndim() - 1), rows = n ? (i64) x.size() / n : 0;
    OFFLOAD_CHECK((i64) scale.size() == n, std::string(fn) + ": scale has " + std::to_string(scale.size()) +
                                       " values, expected " + std::to_string(n));
    OFFLOAD_CHECK(!bias || (i64) bias->size() == n, std::string(fn) + ": bias has " +
                                                std::to_string(bias ? bias->size() : 0) +
                                                " values, expected " + std::to_string(n));
    OFFLOAD_CHECK(std::isfinite(eps) && eps >= 0.f, std::string(fn) + ": epsilon must be finite and >= 0");
    check_apart(fn, "x", y, x, true);
    check_apart(fn, "scale", y, scale, false);
    if (bias) check_apart(fn, "bias", y, *bias, false);
    if (!rows) return;
    const float *xd = x.data(), *gd = scale.data(), *bd = bias ? bias->data() : nullptr;
    float *yd = y.data();
    const i64 per = std::max<i64>(1, kBlock / n);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    in_blocks(rows, per, rows * n >= kParallelElements, [&](i64 a, i64 e) {
        for (i64 r = a; r < e; ++r) layernorm_row(xd + r * n, gd, bd, eps, yd + r * n, n);
    });
}

}  // namespace

void register_row_kernels(nb::module_ &m) {
    // noconvert: an array of another dtype or layout is a TypeError, never a silent copy (a
    // converted ``out`` would be written and thrown away)
    m.def("gelu", &gelu, nb::arg("x").noconvert(), nb::arg("out").noconvert(), nb::arg("gelu"),
          "out = x/2 (1 + erf(x / sqrt 2)) (gelu True) or erf(x), float32, on the CPU pool.");
    m.def("softmax_scaled", &softmax_scaled, nb::arg("x").noconvert(),
          nb::arg("bias").none().noconvert(), nb::arg("scale"), nb::arg("bias_div"),
          nb::arg("out").noconvert(),
          "out = softmax(x * scale + bias[(row // bias_div) % bias rows]) over the last axis.");
    m.def("layernorm", &layernorm, nb::arg("x").noconvert(), nb::arg("scale").noconvert(),
          nb::arg("bias").none().noconvert(), nb::arg("epsilon"), nb::arg("out").noconvert(),
          "Layer normalization over the last axis of x, float32, on the CPU pool.");
}
