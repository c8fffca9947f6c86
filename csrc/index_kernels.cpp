// Index kernels of the graph taggers (top-k, reductions over a run of axes) for the NumPy CPU
// device (offload/drivers/cpu.py build_topk, build_reduce).
//
// Both see x as [outer, n, inner] (C-contiguous) and work along n:
//   topk:   out [outer, k, inner] int64 = the indices of the k largest (or smallest) values,
//           sorted, ties to the lower index, NaN after every number (NaNs by index): what a
//           stable argsort of -x (or x) gives, and onnxruntime. Order-preserving integer keys
//           (no float compare: the flushing of denormals cannot merge two values); k <= 16:
//           each key inserted without a branch into the lanes of one vector, four lines at a
//           time; larger k: an insertion with branches.
//   reduce: out [outer, inner] = sum, mean, max or min over n; NaN propagates (NumPy's
//           max/min); inner == 1: rows summed in float64 (short rows 8 at a time), inner > 1:
//           float32 accumulated in out, as NumPy does.
//   copy_view: out = src for two strided views of one shape and dtype (the layout moves:
//           transpose, slice, tile, expand, concatenation into a part of out), axes merged
//           where both are contiguous across them, rows of the last axis shared out.
// Lines are shared out between the CPU device's pool (pool.h) from kParallel elements on.
//
// Every entry point checks shapes, dtypes and overlaps before touching memory.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using i64 = std::int64_t;
using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using Indices = nb::ndarray<i64, nb::c_contig, nb::device::cpu>;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define INDEX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INDEX_CLONES
#endif

constexpr i64 kParallel = 100000;  // elements; below this the calling thread alone
constexpr i64 kTask = 1 << 15;     // elements per item of the pool

enum Op : int { kSum, kMean, kMax, kMin };

using offload::shape_of;

using offload::check_apart;

// x [outer, n, inner], out [outer, m, inner] (m_axis) or [outer, inner] (no m_axis).
template <typename A>
void check_shapes(const char *fn, const In &x, const A &out, bool m_axis) {
    const std::string want = m_axis ? "[outer, k, inner]" : "[outer, inner]";
    OFFLOAD_CHECK(x.ndim() == 3, std::string(fn) + ": x must be [outer, n, inner], got " + shape_of(x));
    OFFLOAD_CHECK(out.ndim() == (m_axis ? 3u : 2u),
          std::string(fn) + ": out must be " + want + ", got " + shape_of(out));
    const size_t last = out.ndim() - 1;
    OFFLOAD_CHECK(out.shape(0) == x.shape(0) && out.shape(last) == x.shape(2),
          std::string(fn) + ": out must be " + want + " = [" + std::to_string(x.shape(0)) +
              (m_axis ? ", k, " : ", ") + std::to_string(x.shape(2)) + "] for x " + shape_of(x) +
              ", got " + shape_of(out));
}

constexpr std::int32_t kNone = std::numeric_limits<std::int32_t>::min();  // below every key

// Order-preserving keys: a > b as floats <=> key(a) > key(b); -0 == +0; NaN below every number
// (kNone + 1).
inline std::int32_t key_of(float f, bool largest) {
    std::int32_t b;
    std::memcpy(&b, &f, sizeof b);
    const std::int32_t mag = b & 0x7fffffff;
    std::int32_t o = mag == 0 ? 0 : b ^ ((b >> 31) & 0x7fffffff);
    o = largest ? o : ~o;
    return mag > 0x7f800000 ? kNone + 1 : o;
}

typedef std::int32_t v8i __attribute__((vector_size(32)));
typedef std::int32_t v16i __attribute__((vector_size(64)));
#define INDEX_INLINE inline __attribute__((always_inline))

// [fill[0], a[0], ..., a[W - 2]]: every lane one up
#if defined(__clang__)
INDEX_INLINE v8i up1(v8i a, v8i fill) { return __builtin_shufflevector(a, fill, 8, 0, 1, 2, 3, 4, 5, 6); }
INDEX_INLINE v16i up1(v16i a, v16i fill) {
    return __builtin_shufflevector(a, fill, 16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
}
#else
INDEX_INLINE v8i up1(v8i a, v8i fill) { return __builtin_shuffle(a, fill, v8i{8, 0, 1, 2, 3, 4, 5, 6}); }
INDEX_INLINE v16i up1(v16i a, v16i fill) {
    return __builtin_shuffle(a, fill, v16i{16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14});
}
#endif

// The best W keys of G lines so far in the W lanes of a vector each, best first, and their
// indices: each key goes, without a branch, after every lane >= it (ties: the earlier index
// first). G lines at once: independent chains of latency.
template <typename V, int G>
INDEX_INLINE void best_in_lanes(const std::int32_t *lines, i64 n, i64 *idx) {
    constexpr int W = sizeof(V) / sizeof(std::int32_t);
    const V none = V{} + kNone;
    V keys[G], at[G];
    for (int g = 0; g < G; ++g) keys[g] = none, at[g] = V{};
    for (i64 i = 0; i < n; ++i)
        for (int g = 0; g < G; ++g) {
            const V v = V{} + lines[g * n + i];
            const V lt = keys[g] < v;          // a suffix of the lanes: v goes to its first
            const V moved = up1(lt, V{});      // the lanes after that one: one up
            keys[g] = lt ? (moved ? up1(keys[g], none) : v) : keys[g];
            at[g] = lt ? (moved ? up1(at[g], V{}) : V{} + (std::int32_t) i) : at[g];
        }
    for (int g = 0; g < G; ++g)
        for (int r = 0; r < W; ++r) idx[g * W + r] = at[g][r];
}

// The best k of a line by insertion (any k; branches on the data).
INDEX_INLINE void best_by_insertion(const std::int32_t *line, i64 n, i64 k, std::int32_t *keys,
                                    i64 *idx) {
    for (i64 i = 0; i < n; ++i) {
        const std::int32_t v = line[i];
        i64 pos;
        if (i < k) pos = i;
        else if (v > keys[k - 1]) pos = k - 1;
        else continue;
        for (; pos > 0 && v > keys[pos - 1]; --pos) {  // after every key >= v: ties by index
            keys[pos] = keys[pos - 1];
            idx[pos] = idx[pos - 1];
        }
        keys[pos] = v;
        idx[pos] = i;
    }
}

// Lines [l0, l1) of x [outer, n, inner]; line l = (l / inner, l % inner), kLines at a time
// (past l1: the lines of before, again, their results not written).
constexpr int kLines = 4;

INDEX_CLONES
void topk_lines(const float *x, i64 *out, i64 n, i64 k, i64 inner, bool largest, i64 l0, i64 l1) {
    std::vector<std::int32_t> lines(kLines * n, 0), keys(k);
    std::vector<i64> idx(std::max<i64>(kLines * 16, k));
    const bool lanes = k <= 16 && n <= std::numeric_limits<std::int32_t>::max();
    const i64 W = k <= 8 ? 8 : 16;
    for (i64 l = l0; l < l1; l += kLines) {
        const int g = (int) std::min<i64>(kLines, l1 - l);
        for (int q = 0; q < g; ++q) {
            const float *row = x + (l + q) / inner * n * inner + (l + q) % inner;
            std::int32_t *line = lines.data() + q * n;
            if (inner == 1)
                for (i64 i = 0; i < n; ++i) line[i] = key_of(row[i], largest);
            else
                for (i64 i = 0; i < n; ++i) line[i] = key_of(row[i * inner], largest);
        }
        if (lanes && k <= 8) best_in_lanes<v8i, kLines>(lines.data(), n, idx.data());
        else if (lanes) best_in_lanes<v16i, kLines>(lines.data(), n, idx.data());
        for (int q = 0; q < g; ++q) {
            const i64 *best = idx.data() + q * W;
            if (!lanes) {
                best_by_insertion(lines.data() + q * n, n, k, keys.data(), idx.data());
                best = idx.data();
            }
            i64 *dst = out + (l + q) / inner * k * inner + (l + q) % inner;
            for (i64 r = 0; r < k; ++r) dst[r * inner] = best[r];
        }
    }
}

typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

INDEX_INLINE v8f load8(const float *p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// One row: sums in float64 (8 lanes, then the rest), max/min in float32 lanes with the NaNs
// seen kept apart (NumPy's result: NaN).
template <int OP> INDEX_INLINE float reduce_row(const float *row, i64 n) {
    i64 j = 0;
    if (OP == kSum || OP == kMean) {
        v8d acc = {};
        for (; j + 8 <= n; j += 8) acc += __builtin_convertvector(load8(row + j), v8d);
        double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; j < n; ++j) s += row[j];
        if (OP == kSum) return (float) s;
        return n ? (float) (s / (double) n) : std::numeric_limits<float>::quiet_NaN();
    }
    const float start = OP == kMax ? -std::numeric_limits<float>::infinity()
                                   : std::numeric_limits<float>::infinity();
    v8f acc = v8f{} + start;
    v8i nan = {};
    for (; j + 8 <= n; j += 8) {
        const v8f v = load8(row + j);
        acc = (OP == kMax ? v > acc : v < acc) ? v : acc;
        nan |= v != v;
    }
    float m = start;
    bool bad = false;
    for (int l = 0; l < 8; ++l) {
        m = (OP == kMax ? acc[l] > m : acc[l] < m) ? acc[l] : m;
        bad |= nan[l] != 0;
    }
    for (; j < n; ++j) {
        m = (OP == kMax ? row[j] > m : row[j] < m) ? row[j] : m;
        bad |= row[j] != row[j];
    }
    return bad ? std::numeric_limits<float>::quiet_NaN() : m;
}

// Rows of fewer than 16 values, 8 at a time (lane l: row r + l), as reduce_row does each.
template <int OP> INDEX_INLINE v8f reduce_8_rows(const float *b, i64 n) {
    auto column = [&](i64 j) {
        v8f v;
        for (int l = 0; l < 8; ++l) v[l] = b[l * n + j];
        return v;
    };
    if (OP == kSum || OP == kMean) {
        v8d acc = {};
        for (i64 j = 0; j < n; ++j) acc += __builtin_convertvector(column(j), v8d);
        if (OP == kMean) acc /= (double) n;  // n == 0: NaN
        return __builtin_convertvector(acc, v8f);
    }
    v8f acc = v8f{} + (OP == kMax ? -std::numeric_limits<float>::infinity()
                                  : std::numeric_limits<float>::infinity());
    v8i nan = {};
    for (i64 j = 0; j < n; ++j) {
        const v8f v = column(j);
        acc = (OP == kMax ? v > acc : v < acc) ? v : acc;
        nan |= v != v;
    }
    return nan ? v8f{} + std::numeric_limits<float>::quiet_NaN() : acc;
}

template <int OP> INDEX_INLINE void reduce_rows_of(const float *x, float *out, i64 n, i64 r0, i64 r1) {
    i64 r = r0;
    if (n < 16)
        for (; r + 8 <= r1; r += 8) {
            const v8f res = reduce_8_rows<OP>(x + r * n, n);
            std::memcpy(out + r, &res, sizeof res);
        }
    for (; r < r1; ++r) out[r] = reduce_row<OP>(x + r * n, n);
}

// Rows [r0, r1) of x [rows, n] -> out [rows].
INDEX_CLONES
void reduce_rows(const float *x, float *out, i64 n, int op, i64 r0, i64 r1) {
    switch (op) {
    case kSum: reduce_rows_of<kSum>(x, out, n, r0, r1); break;
    case kMean: reduce_rows_of<kMean>(x, out, n, r0, r1); break;
    case kMax: reduce_rows_of<kMax>(x, out, n, r0, r1); break;
    default: reduce_rows_of<kMin>(x, out, n, r0, r1); break;
    }
}

// Blocks [o0, o1) of x [outer, n, inner] -> out [outer, inner], accumulated in out.
INDEX_CLONES
void reduce_columns(const float *x, float *out, i64 n, i64 inner, int op, i64 o0, i64 o1) {
    for (i64 o = o0; o < o1; ++o) {
        const float *src = x + o * n * inner;
        float *dst = out + o * inner;
        if (n == 0) {
            const float id = op == kMean ? std::numeric_limits<float>::quiet_NaN()
                             : op == kMax ? -std::numeric_limits<float>::infinity()
                             : op == kMin ? std::numeric_limits<float>::infinity() : 0.f;
            std::fill(dst, dst + inner, id);
            continue;
        }
        std::copy(src, src + inner, dst);
        for (i64 i = 1; i < n; ++i) {
            const float *s = src + i * inner;
            if (op == kSum || op == kMean)
                for (i64 j = 0; j < inner; ++j) dst[j] += s[j];
            else if (op == kMax)
                for (i64 j = 0; j < inner; ++j) dst[j] = (s[j] > dst[j] || s[j] != s[j]) ? s[j] : dst[j];
            else
                for (i64 j = 0; j < inner; ++j) dst[j] = (s[j] < dst[j] || s[j] != s[j]) ? s[j] : dst[j];
        }
        if (op == kMean)
            for (i64 j = 0; j < inner; ++j) dst[j] /= (float) n;
    }
}

// fn(first, end) over [0, count) in items of about kTask elements (per unit: ``unit``).
template <typename Fn> void share(i64 count, i64 unit, bool parallel, Fn fn) {
    const i64 per = std::max<i64>(1, kTask / std::max<i64>(1, unit));
    offload::parallel_for((count + per - 1) / per, [&](i64 t) {
        fn(t * per, std::min(count, (t + 1) * per));
    }, parallel);
}

void topk(In x, Indices out, bool largest) {
    check_shapes("topk", x, out, true);
    const i64 outer = x.shape(0), n = x.shape(1), inner = x.shape(2), k = out.shape(1);
    OFFLOAD_CHECK(k <= n, "topk: k = " + std::to_string(k) + " (out " + shape_of(out) +
                      ") is larger than n = " + std::to_string(n) + " (x " + shape_of(x) + ")");
    check_apart("topk", "x", out, x);
    if (!k || !outer || !inner) return;
    const float *xd = x.data();
    i64 *od = out.data();
    const bool parallel = (i64) x.size() >= kParallel;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    share(outer * inner, n, parallel, [&](i64 a, i64 b) {
        topk_lines(xd, od, n, k, inner, largest, a, b);
    });
}

void reduce(In x, Out out, const std::string &fn) {
    const int op = fn == "sum" ? kSum : fn == "mean" ? kMean : fn == "max" ? kMax
                   : fn == "min" ? kMin : -1;
    OFFLOAD_CHECK(op >= 0, "reduce: fn must be 'sum', 'mean', 'max' or 'min', got '" + fn + "'");
    check_shapes("reduce", x, out, false);
    check_apart("reduce", "x", out, x);
    const i64 outer = x.shape(0), n = x.shape(1), inner = x.shape(2);
    if (!outer || !inner) return;
    const float *xd = x.data();
    float *od = out.data();
    const bool parallel = (i64) x.size() >= kParallel;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    if (inner == 1)
        share(outer, n, parallel, [&](i64 a, i64 b) { reduce_rows(xd, od, n, op, a, b); });
    else
        share(outer, n * inner, parallel,
              [&](i64 a, i64 b) { reduce_columns(xd, od, n, inner, op, a, b); });
}

// ---- copy_view, binary_view: strided views walked row by row

using View = nb::ndarray<nb::ro, nb::device::cpu>;
using Target = nb::ndarray<nb::device::cpu>;

// [lowest, highest) byte address a strided view touches (empty: lo == hi).
template <typename A> std::pair<std::uintptr_t, std::uintptr_t> extent(const A &a) {
    const auto base = reinterpret_cast<std::uintptr_t>(a.data());
    const i64 item = a.itemsize();
    i64 lo = 0, hi = 0;
    for (size_t d = 0; d < a.ndim(); ++d) {
        if (a.shape(d) == 0) return {base, base};
        const i64 span = ((i64) a.shape(d) - 1) * a.stride(d) * item;
        (span < 0 ? lo : hi) += span;
    }
    return {base + lo, base + hi + item};
}

// out and its sources (each of out's shape, any element strides: 0 for a broadcast axis) as
// few axes as possible: size-1 axes dropped, an axis folded into the next where every operand
// steps over both as one run. Checked: one shape, out writes no element twice, no source
// overlaps out.
struct Walk {
    std::vector<i64> shape;
    std::vector<std::vector<i64>> strides;  // [operand][axis]; operand 0 is out
    i64 rows = 0, len = 0;                  // rows of the last axis, and its length

    Walk(const char *fn, const Target &out, std::initializer_list<const View *> srcs) {
        std::vector<const View *> in(srcs);
        for (const View *v : in) {
            OFFLOAD_CHECK(v->ndim() == out.ndim(), std::string(fn) + ": operands " + shape_of(*v) +
                                               " and out " + shape_of(out) + " must have one rank");
            for (size_t d = 0; d < out.ndim(); ++d)
                OFFLOAD_CHECK(v->shape(d) == out.shape(d), std::string(fn) + ": operand " + shape_of(*v) +
                                                       " and out " + shape_of(out) +
                                                       " must have the same shape");
        }
        OFFLOAD_CHECK(out.ndim() <= 32, std::string(fn) + ": at most 32 axes");
        strides.resize(in.size() + 1);
        for (size_t d = 0; d < out.ndim(); ++d) {
            if (out.shape(d) == 1) continue;
            OFFLOAD_CHECK(out.stride(d) != 0, std::string(fn) + ": out repeats elements (a zero stride)");
            shape.push_back(out.shape(d));
            strides[0].push_back(out.stride(d));
            for (size_t k = 0; k < in.size(); ++k) strides[k + 1].push_back(in[k]->stride(d));
        }
        for (size_t d = shape.size(); d-- > 1;) {
            bool run = true;
            for (auto &st : strides) run = run && st[d - 1] == st[d] * shape[d];
            if (!run) continue;
            shape[d - 1] *= shape[d];
            shape.erase(shape.begin() + d);
            for (auto &st : strides) {
                st[d - 1] = st[d];
                st.erase(st.begin() + d);
            }
        }
        if (shape.empty()) {
            shape = {1};
            for (auto &st : strides) st = {1};
        }
        std::vector<std::pair<i64, i64>> steps;  // out's steps must nest: no element twice
        for (size_t d = 0; d < shape.size(); ++d) steps.push_back({std::abs(strides[0][d]), shape[d]});
        std::sort(steps.begin(), steps.end());
        i64 span = 1;
        for (auto &[stride, n] : steps) {
            OFFLOAD_CHECK(stride >= span, std::string(fn) + ": out's elements overlap one another");
            span = stride * n;
        }
        const auto [o0, o1] = extent(out);
        for (const View *v : in) {
            const auto [s0, s1] = extent(*v);
            OFFLOAD_CHECK(s1 <= o0 || o1 <= s0 || s0 == s1,
                  std::string(fn) + ": out overlaps an operand (it would be read after being written)");
        }
        len = shape.back();
        rows = len ? (i64) out.size() / len : 0;
    }

    // row(pointers, inner strides) for rows [r0, r1); pointers in elements of T
    template <typename T, size_t N, typename Row>
    void rows_of(const std::array<char *, N> &base, i64 r0, i64 r1, Row row) const {
        const size_t nd = shape.size();
        std::vector<i64> idx(nd, 0);
        std::array<i64, N> off{}, inner{};
        for (size_t k = 0; k < N; ++k) inner[k] = strides[k][nd - 1];
        for (i64 r = r0, d = (i64) nd - 2; d >= 0; --d) {
            idx[d] = r % shape[d];
            r /= shape[d];
            for (size_t k = 0; k < N; ++k) off[k] += idx[d] * strides[k][d];
        }
        for (i64 r = r0; r < r1; ++r) {
            std::array<T *, N> ptr;
            for (size_t k = 0; k < N; ++k) ptr[k] = reinterpret_cast<T *>(base[k]) + off[k];
            row(ptr, inner);
            for (i64 d = (i64) nd - 2; d >= 0; --d) {  // next row
                for (size_t k = 0; k < N; ++k) off[k] += strides[k][d];
                if (++idx[d] < shape[d]) break;
                for (size_t k = 0; k < N; ++k) off[k] -= shape[d] * strides[k][d];
                idx[d] = 0;
            }
        }
    }

    template <typename Fn> void in_tasks(i64 elements, Fn fn) const {
        const i64 per = std::max<i64>(1, kTask / std::max<i64>(1, len));
        offload::parallel_for((rows + per - 1) / per, [&](std::int64_t t) {
            fn(t * per, std::min(rows, (t + 1) * per));
        }, elements >= kParallel);
    }
};

template <typename T>
void copy_rows(const Walk &w, const char *src, char *dst, i64 r0, i64 r1) {
    const i64 len = w.len;
    w.rows_of<T, 2>({dst, const_cast<char *>(src)}, r0, r1, [len](auto p, auto s) {
        if (s[0] == 1 && s[1] == 1)
            std::memcpy(p[0], p[1], (size_t) len * sizeof(T));
        else if (s[0] == 1 && s[1] == 0)  // a broadcast axis (an expanded or tiled source)
            std::fill(p[0], p[0] + len, p[1][0]);
        else
            for (i64 j = 0; j < len; ++j) p[0][j * s[0]] = p[1][j * s[1]];
    });
}

// out = src (element by element; both any strides, one shape and dtype, apart in memory).
void copy_view(View src, Target out) {
    const char *fn = "copy_view";
    OFFLOAD_CHECK(src.dtype() == out.dtype(), std::string(fn) + ": src and out must have the same dtype");
    const i64 item = out.itemsize();
    OFFLOAD_CHECK(item == 1 || item == 2 || item == 4 || item == 8,
          std::string(fn) + ": elements of 1, 2, 4 or 8 bytes, got " + std::to_string(item));
    const Walk w(fn, out, {&src});
    if (out.size() == 0) return;
    const char *sd = reinterpret_cast<const char *>(src.data());
    char *od = reinterpret_cast<char *>(out.data());
    nb::gil_scoped_release release;
    w.in_tasks((i64) out.size(), [&](i64 r0, i64 r1) {
        switch (item) {
        case 1: copy_rows<std::uint8_t>(w, sd, od, r0, r1); break;
        case 2: copy_rows<std::uint16_t>(w, sd, od, r0, r1); break;
        case 4: copy_rows<std::uint32_t>(w, sd, od, r0, r1); break;
        default: copy_rows<std::uint64_t>(w, sd, od, r0, r1); break;
        }
    });
}

enum Binary : int { kAdd, kSub, kMul, kDiv, kMaximum, kMinimum };

template <int OP> INDEX_CLONES void binary_row(float *o, const float *a, const float *b, i64 n,
                                               i64 so, i64 sa, i64 sb) {
    auto f = [](float x, float y) {
        if constexpr (OP == kAdd) return x + y;
        else if constexpr (OP == kSub) return x - y;
        else if constexpr (OP == kMul) return x * y;
        else if constexpr (OP == kDiv) return x / y;
        else if constexpr (OP == kMaximum) return (x > y || x != x) ? x : y;  // NaN as NumPy
        else return (x < y || x != x) ? x : y;
    };
    if (so == 1 && sa == 1 && sb == 1)
        for (i64 j = 0; j < n; ++j) o[j] = f(a[j], b[j]);
    else if (so == 1 && sa == 1 && sb == 0)
        for (i64 j = 0; j < n; ++j) o[j] = f(a[j], b[0]);
    else if (so == 1 && sa == 0 && sb == 1)
        for (i64 j = 0; j < n; ++j) o[j] = f(a[0], b[j]);
    else
        for (i64 j = 0; j < n; ++j) o[j * so] = f(a[j * sa], b[j * sb]);
}

// out = a OP b for float32 views of out's shape (broadcast axes: stride 0), apart from out.
void binary_view(View a, View b, Target out, int op) {
    const char *fn = "binary_view";
    OFFLOAD_CHECK(op >= kAdd && op <= kMinimum, std::string(fn) + ": op must be 0..5 (add, sub, mul, div, "
                                                          "maximum, minimum), got " + std::to_string(op));
    const auto f32 = nb::dtype<float>();
    OFFLOAD_CHECK(a.dtype() == f32 && b.dtype() == f32 && out.dtype() == f32,
          std::string(fn) + ": float32 operands and out");
    const Walk w(fn, out, {&a, &b});
    if (out.size() == 0) return;
    std::array<char *, 3> base{reinterpret_cast<char *>(out.data()),
                               const_cast<char *>(reinterpret_cast<const char *>(a.data())),
                               const_cast<char *>(reinterpret_cast<const char *>(b.data()))};
    const i64 len = w.len;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    w.in_tasks((i64) out.size(), [&](i64 r0, i64 r1) {
        w.rows_of<float, 3>(base, r0, r1, [&](auto p, auto s) {
            switch (op) {
            case kAdd: binary_row<kAdd>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            case kSub: binary_row<kSub>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            case kMul: binary_row<kMul>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            case kDiv: binary_row<kDiv>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            case kMaximum: binary_row<kMaximum>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            default: binary_row<kMinimum>(p[0], p[1], p[2], len, s[0], s[1], s[2]); break;
            }
        });
    });
}

}  // namespace

void register_index_kernels(nb::module_ &m) {
    // noconvert: an array of another dtype or layout is a TypeError, never a silent copy
    m.def("topk", &topk, nb::arg("x").noconvert(), nb::arg("out").noconvert(), nb::arg("largest"),
          "out [outer, k, inner] int64 = the indices along n of the k largest (largest=False: "
          "smallest) values of x [outer, n, inner] float32, sorted, ties to the lower index, "
          "NaN after every number (a stable argsort's order). The GIL is released. Shapes and "
          "overlaps are checked first (ValueError; a wrong dtype or layout: TypeError).");
    m.def("reduce", &reduce, nb::arg("x").noconvert(), nb::arg("out").noconvert(), nb::arg("fn"),
          "out [outer, inner] = fn ('sum', 'mean', 'max', 'min') of x [outer, n, inner] float32 "
          "over n; NaN propagates; over n = 0: 0, NaN, -inf, +inf. The GIL is released. Shapes "
          "and overlaps are checked first (ValueError; a wrong dtype or layout: TypeError).");
    m.def("copy_view", &copy_view, nb::arg("src"), nb::arg("out"),
          "out = src, element by element, for two strided views of one shape and dtype (1, 2, 4 "
          "or 8-byte elements) that do not overlap; rows shared out over the pool, the GIL "
          "released.");
    m.def("binary_view", &binary_view, nb::arg("a"), nb::arg("b"), nb::arg("out"), nb::arg("op"),
          "out = a op b (0 add, 1 sub, 2 mul, 3 div, 4 maximum, 5 minimum) for float32 views of "
          "out's shape (a broadcast axis: stride 0) apart from out; rows over the pool.");
}
