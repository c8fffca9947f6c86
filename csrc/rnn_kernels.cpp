// LSTM/GRU layers for the NumPy CPU device (offload/drivers/cpu.py build_rnn).
//
// rnn() first computes the input projection of every time step (X @ W^T over all T * B rows,
// one product), then runs, per direction and per block of batch rows, every time step: the
// recurrent product h @ R^T and the fused gates (vectorised sigmoid/tanh), without returning to
// Python. Both products are one register-blocked loop over weights packed in panels of 16
// columns. Rows are independent, so blocks of rows are shared out between threads, with no
// synchronisation per step. (Not NumPy's BLAS for the projection: OpenBLAS's worker threads
// busy-wait after each call and took the cores from this loop's threads on 2 cores.)
//
// Everything is checked (shapes, dtypes, sequence lengths, overlaps) before memory is touched.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using Lens = nb::ndarray<const std::int32_t, nb::c_contig, nb::device::cpu>;
using i64 = std::int64_t;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define RNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNN_CLONES
#endif
#define RNN_INLINE inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef std::int32_t v8i __attribute__((vector_size(32)));

constexpr int kMR = 6;   // batch rows per block (register block of the recurrent product)
constexpr int kNR = 16;  // columns per register block; packed R^T segments are multiples of it
enum Cell : int { kLSTM = 0, kGRU = 1 };

RNN_INLINE v8 load8(const float *p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
RNN_INLINE void store8(float *p, v8 v) { std::memcpy(p, &v, sizeof v); }
// n (1..8) floats; n == 8, the common case, is one vector move (no variable-size copy)
RNN_INLINE v8 load_n(const float *p, int n) {
    if (n == 8) return load8(p);
    v8 v = {};
    for (int k = 0; k < n; ++k) v[k] = p[k];
    return v;
}
RNN_INLINE void store_n(float *p, v8 v, int n) {
    if (n == 8) return store8(p, v);
    for (int k = 0; k < n; ++k) p[k] = v[k];
}
RNN_INLINE v8 splat(float x) { return v8{} + x; }

// e^x for float32 lanes: 2^n * e^f, |f| <= ln2/2, degree-6 Taylor (relative error < 2e-7).
RNN_INLINE v8 exp8(v8 x) {
    x = x < splat(-87.0f) ? splat(-87.0f) : x;
    x = x > splat(88.0f) ? splat(88.0f) : x;
    const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    v8 n = (x * 1.44269504f + magic) - magic;
    v8 f = x - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    v8 p = splat(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8) bits;
}
RNN_INLINE v8 sigmoid8(v8 x) { return 1.0f / (1.0f + exp8(-x)); }
RNN_INLINE v8 tanh8(v8 x) { return 1.0f - 2.0f / (exp8(x + x) + 1.0f); }
RNN_INLINE v8 clip8(v8 x, float c) {
    if (c <= 0.f) return x;
    x = x < splat(-c) ? splat(-c) : x;
    return x > splat(c) ? splat(c) : x;
}

// C[MR, ncols] = A[MR, K] @ B[K, ncols] with B packed in panels of kNR columns ([ncols / kNR,
// K, kNR], each panel contiguous: streamed in order); ncols a multiple of kNR.
// Every row starts from bias[ncols] (the biases of the gates, folded into the product).
template <int MR>
RNN_INLINE void gemm_block(const float *A, i64 lda, const float *B, i64 K, i64 ncols,
                           const float *bias, float *C, i64 ldc) {
    for (i64 j0 = 0; j0 < ncols; j0 += kNR) {
        v8 acc[MR][2];
        const v8 c0 = load8(bias + j0), c1 = load8(bias + j0 + 8);
        for (int i = 0; i < MR; ++i) {
            acc[i][0] = c0;
            acc[i][1] = c1;
        }
        const float *b = B + j0 * K;
        for (i64 k = 0; k < K; ++k, b += kNR) {
            const v8 b0 = load8(b), b1 = load8(b + 8);
            for (int i = 0; i < MR; ++i) {
                const float x = A[i * lda + k];
                const v8 a = {x, x, x, x, x, x, x, x};  // one broadcast from memory
                acc[i][0] += a * b0;
                acc[i][1] += a * b1;
            }
        }
        for (int i = 0; i < MR; ++i) {
            store8(C + i * ldc + j0, acc[i][0]);
            store8(C + i * ldc + j0 + 8, acc[i][1]);
        }
    }
}

RNN_INLINE void gemm_rows(int mr, const float *A, i64 lda, const float *B, i64 K, i64 ncols,
                          const float *bias, float *C, i64 ldc) {
    switch (mr) {
    case 6: gemm_block<6>(A, lda, B, K, ncols, bias, C, ldc); break;
    case 5: gemm_block<5>(A, lda, B, K, ncols, bias, C, ldc); break;
    case 4: gemm_block<4>(A, lda, B, K, ncols, bias, C, ldc); break;
    case 3: gemm_block<3>(A, lda, B, K, ncols, bias, C, ldc); break;
    case 2: gemm_block<2>(A, lda, B, K, ncols, bias, C, ldc); break;
    default: gemm_block<1>(A, lda, B, K, ncols, bias, C, ldc); break;
    }
}

i64 pad16(i64 n) { return (n + kNR - 1) / kNR * kNR; }

struct Layer {
    int cell, D;
    bool reverse[2];
    i64 T, B, H, G, NP, seg1;  // seg1: start of the second packed segment (GRU's h gate)
    i64 XS;                     // floats between rows of xw (D * NX)
    const float *xw, *rt, *wb, *gb, *p, *h0, *c0;  // gb [D, NP]: the biases the products start from
    const std::int32_t *lens;
    float *out;
    float clip;
    bool input_forget, lbr;
};

// One direction, one block of mr batch rows from b0, every time step.
RNN_INLINE void run_block(const Layer &L, int d, i64 b0, int mr, float *h, float *c, float *g,
                          float *rh) {
    const i64 H = L.H, B = L.B, D = L.D, NP = L.NP, GH = L.G * H;
    const float *rt = L.rt + d * H * NP, *wb = L.wb + d * GH, *gb = L.gb + d * NP;
    const float *p = L.p ? L.p + d * 3 * H : nullptr;
    for (int i = 0; i < mr; ++i) {
        const i64 row = (d * B + b0 + i) * H;
        if (L.h0) std::copy(L.h0 + row, L.h0 + row + H, h + i * H);
        else std::fill(h + i * H, h + (i + 1) * H, 0.f);
        if (L.cell == kLSTM) {
            if (L.c0) std::copy(L.c0 + row, L.c0 + row + H, c + i * H);
            else std::fill(c + i * H, c + (i + 1) * H, 0.f);
        }
    }
    i64 longest = 0;
    for (int i = 0; i < mr; ++i) longest = std::max<i64>(longest, L.lens ? L.lens[b0 + i] : L.T);
    const float clip = L.clip;
    auto y_row = [&](i64 t, int i) { return L.out + ((t * D + d) * B + b0 + i) * H; };
    for (i64 s = 0; s < L.T; ++s) {
        if (s >= longest) {  // every row of the block is past its length: zeros
            for (int i = 0; i < mr; ++i) std::fill(y_row(s, i), y_row(s, i) + H, 0.f);
            continue;
        }
        const i64 first_cols = (L.cell == kGRU && !L.lbr) ? L.seg1 : NP;
        gemm_rows(mr, h, H, rt, H, first_cols, gb, g, NP);
        for (int i = 0; i < mr; ++i) {
            const i64 len = L.lens ? L.lens[b0 + i] : L.T;
            float *hi = h + i * H, *ci = c + i * H, *gi = g + i * NP;
            if (s >= len) {
                std::fill(y_row(s, i), y_row(s, i) + H, 0.f);
                if (rh) std::fill(rh + i * H, rh + (i + 1) * H, 0.f);
                continue;
            }
            const i64 t = L.reverse[d] ? len - 1 - s : s;
            const float *x = L.xw + (t * B + b0 + i) * L.XS + d * (L.XS / D);
            float *y = y_row(t, i);
            for (i64 j = 0; j < H; j += 8) {
                const int n = (int) std::min<i64>(8, H - j);
                auto in = [&](const float *base, i64 gate) { return load_n(base + gate * H + j, n); };
                if (L.cell == kLSTM) {
                    const v8 cp = load_n(ci + j, n);
                    v8 ig = in(x, 0) + in(gi, 0);
                    v8 og = in(x, 1) + in(gi, 1);
                    v8 fg = in(x, 2) + in(gi, 2);
                    v8 cg = in(x, 3) + in(gi, 3);
                    if (p) {
                        ig += in(p, 0) * cp;
                        fg += in(p, 2) * cp;
                    }
                    ig = sigmoid8(clip8(ig, clip));
                    fg = L.input_forget ? 1.0f - ig : sigmoid8(clip8(fg, clip));
                    cg = tanh8(clip8(cg, clip));
                    const v8 cn = fg * cp + ig * cg;
                    if (p) og += in(p, 1) * cn;
                    og = sigmoid8(clip8(og, clip));
                    const v8 hn = og * tanh8(cn);
                    store_n(ci + j, cn, n);
                    store_n(hi + j, hn, n);
                    store_n(y + j, hn, n);
                } else {
                    const v8 hp = load_n(hi + j, n);
                    const v8 z = sigmoid8(clip8(in(x, 0) + in(gi, 0), clip));
                    const v8 r = sigmoid8(clip8(in(x, 1) + in(gi, 1), clip));
                    if (!L.lbr) {  // the h gate needs (r * h) @ Rh^T first: keep z, r * h
                        store_n(gi + j, z, n);
                        store_n(rh + i * H + j, r * hp, n);
                        continue;
                    }
                    const v8 gh = load_n(gi + L.seg1 + j, n);  // h @ Rh^T + Rbh
                    const v8 hc = tanh8(clip8(in(x, 2) + in(wb, 2) + r * gh, clip));
                    const v8 hn = (1.0f - z) * hc + z * hp;
                    store_n(hi + j, hn, n);
                    store_n(y + j, hn, n);
                }
            }
        }
        if (L.cell != kGRU || L.lbr) continue;
        gemm_rows(mr, rh, H, rt + L.seg1 * H, H, NP - L.seg1, gb + L.seg1, g + L.seg1, NP);
        for (int i = 0; i < mr; ++i) {
            const i64 len = L.lens ? L.lens[b0 + i] : L.T;
            if (s >= len) continue;
            const i64 t = L.reverse[d] ? len - 1 - s : s;
            const float *x = L.xw + (t * B + b0 + i) * L.XS + d * (L.XS / D);
            float *hi = h + i * H, *gi = g + i * NP, *y = y_row(t, i);
            for (i64 j = 0; j < H; j += 8) {
                const int n = (int) std::min<i64>(8, H - j);
                const v8 z = load_n(gi + j, n), hp = load_n(hi + j, n);
                const v8 pre = load_n(x + 2 * H + j, n) + load_n(gi + L.seg1 + j, n);
                const v8 hn = (1.0f - z) * tanh8(clip8(pre, clip)) + z * hp;
                store_n(hi + j, hn, n);
                store_n(y + j, hn, n);
            }
        }
    }
    for (int i = 0; i < mr; ++i) {  // Y_h (and Y_c): the state after the last step
        if (L.lens && L.lens[b0 + i] == 0) {  // no step: zeros, as onnxruntime
            std::fill(y_row(L.T, i), y_row(L.T, i) + H, 0.f);
            if (L.cell == kLSTM) std::fill(y_row(L.T + 1, i), y_row(L.T + 1, i) + H, 0.f);
            continue;
        }
        std::copy(h + i * H, h + (i + 1) * H, y_row(L.T, i));
        if (L.cell == kLSTM) std::copy(c + i * H, c + (i + 1) * H, y_row(L.T + 1, i));
    }
}

// Blocks [blk0, blk1) of every direction; buffers of its own (one thread).
RNN_CLONES
void run_blocks(const Layer &L, i64 blk0, i64 blk1) {
    std::vector<float> h(kMR * L.H), c(kMR * L.H), g(kMR * L.NP), rh(kMR * L.H);
    const bool need_rh = L.cell == kGRU && !L.lbr;
    for (int d = 0; d < L.D; ++d)
        for (i64 blk = blk0; blk < blk1; ++blk) {
            const i64 b0 = blk * kMR;
            const int mr = (int) std::min<i64>(kMR, L.B - b0);
            run_block(L, d, b0, mr, h.data(), c.data(), g.data(), need_rh ? rh.data() : nullptr);
        }
}

// The input projection xw[r, d * NX:(d + 1) * NX] = x[r] @ W_d^T of rows [blk0, blk1) * kMR
// of x [rows, I] (wtp: W^T in panels of 16 columns, [D, NX / 16, I, 16]).
struct Projection {
    const float *x, *wtp, *zeros;
    float *xw;
    i64 rows, I, NX, D;
};

RNN_CLONES
void project_blocks(const Projection &P, i64 blk0, i64 blk1) {
    for (i64 blk = blk0; blk < blk1; ++blk) {
        const i64 r0 = blk * kMR;
        const int mr = (int) std::min<i64>(kMR, P.rows - r0);
        for (i64 d = 0; d < P.D; ++d)
            gemm_rows(mr, P.x + r0 * P.I, P.I, P.wtp + d * P.NX * P.I, P.I, P.NX, P.zeros,
                      P.xw + r0 * P.D * P.NX + d * P.NX, P.D * P.NX);
    }
}

// fn(first block, end block) over ``blocks`` blocks shared out between up to n threads of the
// CPU device's pool (pool.h): one contiguous range per thread, no synchronisation inside.
template <typename Fn> void in_threads(i64 n, i64 blocks, Fn fn) {
    n = std::max<i64>(1, std::min<i64>({n, blocks, (i64) offload::pool_threads()}));
    if (n == 1) {
        fn(0, blocks);
        return;
    }
    const i64 per = (blocks + n - 1) / n;
    offload::parallel_for(n, [&](std::int64_t k) {
        fn(std::min(blocks, k * per), std::min(blocks, (k + 1) * per));
    });
}

void check(bool ok, const std::string &what) {
    if (!ok) throw nb::value_error(("rnn: " + what).c_str());
}

std::string shape_str(const nb::ndarray<> &a) {
    std::string s = "[";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

template <typename A> std::string shape_of(const A &a) { return shape_str(nb::ndarray<>(a.handle())); }

template <typename A> void check_shape(const A &a, std::vector<i64> want, const char *what) {
    bool ok = a.ndim() == want.size();
    for (size_t i = 0; ok && i < want.size(); ++i) ok = (i64) a.shape(i) == want[i];
    std::string w = "[";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
    check(ok, std::string(what) + " must have shape " + w + "], got " + shape_of(a));
}

template <typename A> void check_apart(const Out &out, const A &in, const char *what) {
    auto o0 = reinterpret_cast<std::uintptr_t>(out.data());
    auto o1 = o0 + out.size() * sizeof(float);
    auto i0 = reinterpret_cast<std::uintptr_t>(in.data());
    auto i1 = i0 + in.size() * sizeof(*in.data());
    check(o0 >= o1 || i0 >= i1 || o1 <= i0 || i1 <= o0,
          std::string("out overlaps ") + what + " (it would be read after being written)");
}

// See the module docstring of offload._core (core.cpp) and drivers/cpu.py build_rnn.
void rnn(int cell, int direction, In x, In wtp, Out xw, In rt, In wb, In rb, std::optional<In> p,
         std::optional<Lens> lens, std::optional<In> h0, std::optional<In> c0, Out out, float clip,
         bool input_forget, bool linear_before_reset, int threads) {
    check(cell == kLSTM || cell == kGRU, "cell must be 0 (LSTM) or 1 (GRU), got " + std::to_string(cell));
    check(direction >= 0 && direction <= 2,
          "direction must be 0 (forward), 1 (reverse) or 2 (bidirectional), got " + std::to_string(direction));
    check(std::isfinite(clip) && clip >= 0.f, "clip must be finite and >= 0");
    const int D = direction == 2 ? 2 : 1;
    const i64 G = cell == kLSTM ? 4 : 3, extra = cell == kLSTM ? 2 : 1;
    check(out.ndim() == 4, "out must be [T + " + std::to_string(extra) + ", D, B, H], got " + shape_of(out));
    const i64 T = (i64) out.shape(0) - extra, B = out.shape(2), H = out.shape(3);
    check(T >= 0 && (i64) out.shape(1) == D && H > 0,
          "out " + shape_of(out) + " is not [T + " + std::to_string(extra) + ", " + std::to_string(D) +
              ", B, H] with H > 0");
    const i64 seg1 = cell == kLSTM ? pad16(4 * H) : pad16(2 * H);
    const i64 NP = cell == kLSTM ? seg1 : seg1 + pad16(H);
    check(x.ndim() == 3, "x must be [T, B, I], got " + shape_of(x));
    const i64 I = x.shape(2), NX = pad16(G * H);
    check_shape(x, {T, B, I}, "x");
    check_shape(wtp, {D, NX / kNR, I, kNR}, "wtp (W^T in panels of 16 columns)");
    check_shape(xw, {T, B, D * NX}, "xw (the scratch of the input projection)");
    check_shape(rt, {D, NP / kNR, H, kNR}, "rt (R^T packed in panels of 16 columns)");
    check_shape(wb, {D, G * H}, "wb");
    check_shape(rb, {D, G * H}, "rb");
    if (p) {
        check(cell == kLSTM, "peepholes p on a GRU");
        check_shape(*p, {D, 3 * H}, "p");
    }
    if (h0) check_shape(*h0, {D, B, H}, "initial_h");
    if (c0) {
        check(cell == kLSTM, "initial_c on a GRU");
        check_shape(*c0, {D, B, H}, "initial_c");
    }
    if (lens) {
        check_shape(*lens, {B}, "sequence_lens");
        for (i64 b = 0; b < B; ++b)
            check(lens->data()[b] >= 0 && lens->data()[b] <= T,
                  "sequence_lens[" + std::to_string(b) + "] = " + std::to_string(lens->data()[b]) +
                      " is outside [0, " + std::to_string(T) + "]");
        check_apart(out, *lens, "sequence_lens");
    }
    check_apart(out, xw, "xw");
    check_apart(xw, x, "x");
    check_apart(xw, wtp, "wtp");
    check_apart(xw, rt, "rt");
    check_apart(xw, wb, "wb");
    check_apart(xw, rb, "rb");
    if (p) check_apart(xw, *p, "p");
    if (h0) check_apart(xw, *h0, "initial_h");
    if (c0) check_apart(xw, *c0, "initial_c");
    if (lens) check_apart(xw, *lens, "sequence_lens");
    check_apart(out, x, "x");
    check_apart(out, wtp, "wtp");
    check_apart(out, rt, "rt");
    check_apart(out, wb, "wb");
    check_apart(out, rb, "rb");
    if (p) check_apart(out, *p, "p");
    if (h0) check_apart(out, *h0, "initial_h");
    if (c0) check_apart(out, *c0, "initial_c");
    // the products start from the biases: LSTM all of W's and R's; GRU z, r both, and the h
    // gate R's (linear_before_reset: inside r * (...)) or both (else)
    std::vector<float> gb(D * NP, 0.f);
    for (int d = 0; d < D; ++d) {
        const float *w = wb.data() + d * G * H, *r = rb.data() + d * G * H;
        float *o = gb.data() + d * NP;
        const i64 both = cell == kLSTM ? 4 * H : 2 * H;
        for (i64 n = 0; n < both; ++n) o[n] = w[n] + r[n];
        if (cell == kGRU)
            for (i64 n = 0; n < H; ++n)
                o[seg1 + n] = r[2 * H + n] + (linear_before_reset ? 0.f : w[2 * H + n]);
    }
    Layer L{cell, D, {direction == 1, direction == 2}, T, B, H, G, NP, seg1, D * NX,
            xw.data(), rt.data(), wb.data(), gb.data(), p ? p->data() : nullptr,
            h0 ? h0->data() : nullptr, c0 ? c0->data() : nullptr,
            lens ? lens->data() : nullptr, out.data(), clip, input_forget, linear_before_reset};
    if (B == 0) return;
    std::vector<float> zeros(NX, 0.f);
    const Projection P{x.data(), wtp.data(), zeros.data(), xw.data(), T * B, I, NX, D};
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    // every step's input projection first (one product over T * B rows), then the time loop;
    // both shared out between the threads by blocks of rows
    in_threads(threads, (T * B + kMR - 1) / kMR,
               [&P](i64 a, i64 b) { project_blocks(P, a, b); });
    in_threads(threads, (B + kMR - 1) / kMR, [&L](i64 a, i64 b) { run_blocks(L, a, b); });
}

}  // namespace

void register_rnn_kernels(nb::module_ &m) {
    // noconvert: an array of another dtype or layout is a TypeError, never a silent copy
    // (a converted ``out`` would be written and thrown away)
    m.def("rnn", &rnn, nb::arg("cell"), nb::arg("direction"), nb::arg("x").noconvert(),
          nb::arg("wtp").noconvert(), nb::arg("xw").noconvert(),
          nb::arg("rt").noconvert(), nb::arg("wb").noconvert(), nb::arg("rb").noconvert(),
          nb::arg("p").none().noconvert(), nb::arg("lens").none().noconvert(),
          nb::arg("h0").none().noconvert(), nb::arg("c0").none().noconvert(),
          nb::arg("out").noconvert(), nb::arg("clip"),
          nb::arg("input_forget"), nb::arg("linear_before_reset"), nb::arg("threads"),
          "One LSTM (cell 0) or GRU (cell 1) layer over ``x`` [T, B, I]: first the input "
          "projection of every step into the scratch ``xw`` [T, B, D * NX] (NX = G*H padded "
          "to 16) with ``wtp`` [D, NX / 16, I, 16] (W^T in panels of 16 columns), then the "
          "time loop; ``rt`` [D, NP / 16, H, 16] R^T in panels "
          "of 16 columns, its gate segments padded to 16 columns (LSTM: i, o, f, c; GRU: z, r "
          "| h), biases ``wb``/``rb`` [D, "
          "G*H], optional peepholes ``p`` [D, 3H], int32 ``lens`` [B] (each in [0, T]), "
          "``h0``/``c0`` [D, B, H]; writes ``out`` [T + 2 (GRU: + 1), D, B, H] = Y, Y_h (, "
          "Y_c), zeros past each length (Y_h, Y_c of a length-0 row: zeros). direction: 0 forward, 1 reverse, 2 both; clip 0: "
          "none. The batch is shared between up to ``threads`` threads; the GIL is released. "
          "Every shape is checked first (ValueError; a wrong dtype or a non-C-contiguous array: "
          "TypeError).");
}
