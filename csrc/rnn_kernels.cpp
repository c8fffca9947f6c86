// LSTM/GRU layers for the NumPy CPU device (offload/drivers/cpu.py build_rnn).
//
// rnn() runs, per direction and per block of batch rows, every time step: the input projection
// x_t @ W^T and the recurrent product h @ R^T (for an LSTM one pass over both: W^T and R^T have
// the same columns) and the fused gates (vectorised sigmoid/tanh), without returning to Python.
// The products are one register-blocked loop over weights packed in panels of 16 columns, 8
// lanes wide (AVX2, or the baseline) or 16 (AVX-512, picked at run time). Rows are independent,
// so blocks of rows are shared out between threads, with no synchronisation per step. (The
// projection was once one product over all T * B rows before the loop: its [T, B, 4H] result
// went out to memory and back: a quarter of the time of DeepJet's 150-unit LSTM at batch 1024.)
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

#include "gemm.h"
#include "checks.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using Lens = nb::ndarray<const std::int32_t, nb::c_contig, nb::device::cpu>;
using i64 = std::int64_t;
using namespace offload::gemm;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define RNN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RNN_CLONES
#endif
#define RNN_INLINE inline __attribute__((always_inline))
#define RNN_INLINE_LAMBDA __attribute__((always_inline))

enum Cell : int { kLSTM = 0, kGRU = 1 };

// e^x for float32 lanes: 2^n * e^f, |f| <= ln2/2, degree-6 Taylor (relative error < 2e-7).
template <typename V> RNN_INLINE V exp_v(V x) {
    x = x < splat<V>(-87.0f) ? splat<V>(-87.0f) : x;
    x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
    const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    V n = (x * 1.44269504f + magic) - magic;
    V f = x - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
    V p = splat<V>(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    typedef typename Tile<V>::I VI;
    VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    return p * (V) bits;
}
template <typename V> RNN_INLINE V sigmoid_v(V x) { return 1.0f / (1.0f + exp_v(-x)); }
template <typename V> RNN_INLINE V tanh_v(V x) { return 1.0f - 2.0f / (exp_v(x + x) + 1.0f); }
template <typename V> RNN_INLINE V clip_v(V x, float c) {
    if (c <= 0.f) return x;
    x = x < splat<V>(-c) ? splat<V>(-c) : x;
    return x > splat<V>(c) ? splat<V>(c) : x;
}

struct Layer {
    int cell, D;
    bool reverse[2];
    i64 T, B, H, G, NP, seg1;  // seg1: start of the second packed segment (GRU's h gate)
    i64 I, NX;                  // NX: columns of the packed W^T (G * H padded to 16)
    // xb [D, NX], gb [D, NP]: the biases the products start from; p: peepholes (a vector of slack)
    const float *x, *wtp, *xb, *rt, *gb, *p, *h0, *c0;
    const std::int32_t *lens;
    float *out;
    float clip;
    bool input_forget, lbr;
};

// A thread's buffers for a block: h, c, rh (r * h), z [MR, ldh] (rows padded to whole vectors:
// the gates load and store whole vectors, the lanes past H are never used), g [MR, NP] and
// xs [MR, NX] the products (and a vector of slack after them), xa [MR, I] the step's inputs.
struct Buffers {
    i64 ldh;
    float *h, *c, *rh, *z, *g, *xs, *xa;
};

// One direction, one block of mr batch rows from b0, every time step.
template <typename V>
RNN_INLINE void run_block(const Layer &L, int d, i64 b0, int mr, const Buffers &bf) {
    constexpr int W = kLanes<V>;
    const i64 H = L.H, B = L.B, D = L.D, NP = L.NP, I = L.I, NX = L.NX, ldh = bf.ldh;
    const float *rt = L.rt + d * H * NP, *gb = L.gb + d * NP, *wt = L.wtp + d * I * NX;
    const float *xb = L.xb + d * NX, *p = L.p ? L.p + d * 3 * H : nullptr;
    float *h = bf.h, *c = bf.c, *g = bf.g, *xs = bf.xs;
    for (int i = 0; i < mr; ++i) {
        const i64 row = (d * B + b0 + i) * H;
        if (L.h0) std::copy(L.h0 + row, L.h0 + row + H, h + i * ldh);
        else std::fill(h + i * ldh, h + i * ldh + H, 0.f);
        if (L.cell == kLSTM) {
            if (L.c0) std::copy(L.c0 + row, L.c0 + row + H, c + i * ldh);
            else std::fill(c + i * ldh, c + i * ldh + H, 0.f);
        }
    }
    i64 longest = 0;
    for (int i = 0; i < mr; ++i) longest = std::max<i64>(longest, L.lens ? L.lens[b0 + i] : L.T);
    const float clip = L.clip;
    auto y_row = [&](i64 t, int i) { return L.out + ((t * D + d) * B + b0 + i) * H; };
    auto len_of = [&](int i) { return L.lens ? L.lens[b0 + i] : L.T; };
    auto step_of = [&](int i, i64 s) { return L.reverse[d] ? len_of(i) - 1 - s : s; };
    for (i64 s = 0; s < L.T; ++s) {
        if (s >= longest) {  // every row of the block is past its length: zeros
            for (int i = 0; i < mr; ++i) std::fill(y_row(s, i), y_row(s, i) + H, 0.f);
            continue;
        }
        // the input projection of the step's rows (each at its own step: reversed rows end
        // at their own lengths), then the recurrent product
        for (int i = 0; i < mr; ++i)
            if (s < len_of(i))
                std::copy_n(L.x + (step_of(i, s) * B + b0 + i) * I, I, bf.xa + i * I);
        const Operands xin{bf.xa, I, wt, I}, hin{h, ldh, rt, H}, none{};
        if (L.cell == kLSTM) {  // W^T and R^T: the same columns
            gemm_rows<V>(mr, xin, hin, NP, gb, g, NP);
        } else {
            gemm_rows<V>(mr, xin, none, NX, xb, xs, NX);
            gemm_rows<V>(mr, hin, none, L.lbr ? NP : L.seg1, gb, g, NP);
        }
        for (int i = 0; i < mr; ++i) {
            float *hi = h + i * ldh, *ci = c + i * ldh, *gi = g + i * NP;
            const float *x = xs + i * NX;
            if (s >= len_of(i)) {
                std::fill(y_row(s, i), y_row(s, i) + H, 0.f);
                if (bf.rh) std::fill(bf.rh + i * ldh, bf.rh + (i + 1) * ldh, 0.f);
                continue;
            }
            // whole vectors: the loads past a gate's H columns read the next gate's (or the
            // slack), and what they give lands in the padding of h, c, rh and z
            for (i64 j = 0; j < H; j += W) {
                auto in = [&](const float *base, i64 gate) RNN_INLINE_LAMBDA {
                    return load<V>(base + gate * H + j);
                };
                if (L.cell == kLSTM) {
                    const V cp = load<V>(ci + j);
                    V ig = in(gi, 0), og = in(gi, 1), fg = in(gi, 2), cg = in(gi, 3);
                    if (p) {
                        ig += in(p, 0) * cp;
                        fg += in(p, 2) * cp;
                    }
                    ig = sigmoid_v(clip_v(ig, clip));
                    fg = L.input_forget ? 1.0f - ig : sigmoid_v(clip_v(fg, clip));
                    cg = tanh_v(clip_v(cg, clip));
                    const V cn = fg * cp + ig * cg;
                    if (p) og += in(p, 1) * cn;
                    og = sigmoid_v(clip_v(og, clip));
                    store(ci + j, cn);
                    store(hi + j, og * tanh_v(cn));
                } else {
                    const V hp = load<V>(hi + j);
                    const V z = sigmoid_v(clip_v(in(x, 0) + in(gi, 0), clip));
                    const V r = sigmoid_v(clip_v(in(x, 1) + in(gi, 1), clip));
                    if (!L.lbr) {  // the h gate needs (r * h) @ Rh^T first: keep z, r * h
                        store(bf.z + i * ldh + j, z);
                        store(bf.rh + i * ldh + j, r * hp);
                        continue;
                    }
                    const V gh = load<V>(gi + L.seg1 + j);  // h @ Rh^T + Rbh
                    const V hc = tanh_v(clip_v(in(x, 2) + r * gh, clip));  // x: + Wbh
                    store(hi + j, (1.0f - z) * hc + z * hp);
                }
            }
            if (L.cell == kLSTM || L.lbr) std::copy_n(hi, H, y_row(step_of(i, s), i));
        }
        if (L.cell != kGRU || L.lbr) continue;
        gemm_rows<V>(mr, Operands{bf.rh, ldh, rt + L.seg1 * H, H}, Operands{}, NP - L.seg1,
                     gb + L.seg1, g + L.seg1, NP);
        for (int i = 0; i < mr; ++i) {
            if (s >= len_of(i)) continue;
            const float *x = xs + i * NX, *gi = g + i * NP, *zi = bf.z + i * ldh;
            float *hi = h + i * ldh;
            for (i64 j = 0; j < H; j += W) {
                const V z = load<V>(zi + j), hp = load<V>(hi + j);
                const V pre = load<V>(x + 2 * H + j) + load<V>(gi + L.seg1 + j);
                store(hi + j, (1.0f - z) * tanh_v(clip_v(pre, clip)) + z * hp);
            }
            std::copy_n(hi, H, y_row(step_of(i, s), i));
        }
    }
    for (int i = 0; i < mr; ++i) {  // Y_h (and Y_c): the state after the last step
        if (len_of(i) == 0) {  // no step: zeros, as onnxruntime
            std::fill(y_row(L.T, i), y_row(L.T, i) + H, 0.f);
            if (L.cell == kLSTM) std::fill(y_row(L.T + 1, i), y_row(L.T + 1, i) + H, 0.f);
            continue;
        }
        std::copy_n(h + i * ldh, H, y_row(L.T, i));
        if (L.cell == kLSTM) std::copy_n(c + i * ldh, H, y_row(L.T + 1, i));
    }
}

// Blocks [blk0, blk1) (of Tile<V>::MR rows) of every direction; buffers of its own (one thread).
template <typename V> RNN_INLINE void run_blocks(const Layer &L, i64 blk0, i64 blk1) {
    constexpr int MR = Tile<V>::MR, W = kLanes<V>;
    const i64 ldh = (L.H + W - 1) / W * W;
    std::vector<float> h(MR * ldh), c(MR * ldh), rh(MR * ldh), z(MR * ldh), g(MR * L.NP + W),
        xs(MR * L.NX + W), xa(MR * L.I);
    const bool gru = L.cell == kGRU && !L.lbr;  // the two-product GRU
    const Buffers bf{ldh, h.data(), c.data(), gru ? rh.data() : nullptr, z.data(), g.data(),
                     xs.data(), xa.data()};
    for (int d = 0; d < L.D; ++d)
        for (i64 blk = blk0; blk < blk1; ++blk) {
            const i64 b0 = blk * MR;
            run_block<V>(L, d, b0, (int) std::min<i64>(MR, L.B - b0), bf);
        }
}

// The loop once per instruction set: 16 lanes where the CPU has AVX-512 (kernel() picks),
// else 8 (AVX2 or the baseline, one clone each).
__attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2")))
void run_blocks_avx512(const Layer &L, i64 blk0, i64 blk1) { run_blocks<v16>(L, blk0, blk1); }
RNN_CLONES void run_blocks_v8(const Layer &L, i64 blk0, i64 blk1) { run_blocks<v8>(L, blk0, blk1); }

struct Kernel {
    void (*run)(const Layer &, i64, i64);
    int rows;  // batch rows per block
};

// wide false: the 8-lane kernel even on AVX-512 (the tests run both)
Kernel kernel(bool wide) {
    if (wide && has_avx512()) return {run_blocks_avx512, Tile<v16>::MR};
    return {run_blocks_v8, Tile<v8>::MR};
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

#define RNN_CHECK(ok, what) OFFLOAD_CHECK(ok, std::string("rnn: ") + (what))

using offload::shape_of;

template <typename A> void check_shape(const A &a, std::vector<i64> want, const char *what) {
    bool ok = a.ndim() == want.size();
    for (size_t i = 0; ok && i < want.size(); ++i) ok = (i64) a.shape(i) == want[i];
    if (ok) return;
    std::string w = "[";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
    RNN_CHECK(ok, std::string(what) + " must have shape " + w + "], got " + shape_of(a));
}

template <typename A> void check_apart(const Out &out, const A &in, const char *what) {
    offload::check_apart("rnn", what, out, in);
}

// See the module docstring of offload._core (core.cpp) and drivers/cpu.py build_rnn.
void rnn(int cell, int direction, In x, In wtp, In rt, In wb, In rb, std::optional<In> p,
         std::optional<Lens> lens, std::optional<In> h0, std::optional<In> c0, Out out, float clip,
         bool input_forget, bool linear_before_reset, int threads, bool wide) {
    RNN_CHECK(cell == kLSTM || cell == kGRU, "cell must be 0 (LSTM) or 1 (GRU), got " + std::to_string(cell));
    RNN_CHECK(direction >= 0 && direction <= 2,
          "direction must be 0 (forward), 1 (reverse) or 2 (bidirectional), got " + std::to_string(direction));
    RNN_CHECK(std::isfinite(clip) && clip >= 0.f, "clip must be finite and >= 0");
    const int D = direction == 2 ? 2 : 1;
    const i64 G = cell == kLSTM ? 4 : 3, extra = cell == kLSTM ? 2 : 1;
    RNN_CHECK(out.ndim() == 4, "out must be [T + " + std::to_string(extra) + ", D, B, H], got " + shape_of(out));
    const i64 T = (i64) out.shape(0) - extra, B = out.shape(2), H = out.shape(3);
    RNN_CHECK(T >= 0 && (i64) out.shape(1) == D && H > 0,
          "out " + shape_of(out) + " is not [T + " + std::to_string(extra) + ", " + std::to_string(D) +
              ", B, H] with H > 0");
    const i64 seg1 = cell == kLSTM ? pad16(4 * H) : pad16(2 * H);
    const i64 NP = cell == kLSTM ? seg1 : seg1 + pad16(H);
    RNN_CHECK(x.ndim() == 3, "x must be [T, B, I], got " + shape_of(x));
    const i64 I = x.shape(2), NX = pad16(G * H);
    check_shape(x, {T, B, I}, "x");
    check_shape(wtp, {D, NX / kNR, I, kNR}, "wtp (W^T in panels of 16 columns)");
    check_shape(rt, {D, NP / kNR, H, kNR}, "rt (R^T packed in panels of 16 columns)");
    check_shape(wb, {D, G * H}, "wb");
    check_shape(rb, {D, G * H}, "rb");
    if (p) {
        RNN_CHECK(cell == kLSTM, "peepholes p on a GRU");
        check_shape(*p, {D, 3 * H}, "p");
    }
    if (h0) check_shape(*h0, {D, B, H}, "initial_h");
    if (c0) {
        RNN_CHECK(cell == kLSTM, "initial_c on a GRU");
        check_shape(*c0, {D, B, H}, "initial_c");
    }
    if (lens) {
        check_shape(*lens, {B}, "sequence_lens");
        for (i64 b = 0; b < B; ++b)
            RNN_CHECK(lens->data()[b] >= 0 && lens->data()[b] <= T,
                  "sequence_lens[" + std::to_string(b) + "] = " + std::to_string(lens->data()[b]) +
                      " is outside [0, " + std::to_string(T) + "]");
        check_apart(out, *lens, "sequence_lens");
    }
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
    // the input projection starts from zeros, but for the h gate of a linear_before_reset
    // GRU (its W bias, outside r * (...)); the peepholes get a vector of slack (whole-vector
    // loads)
    std::vector<float> xb(D * NX, 0.f), ps;
    if (cell == kGRU && linear_before_reset)
        for (int d = 0; d < D; ++d)
            std::copy_n(wb.data() + d * G * H + 2 * H, H, xb.data() + d * NX + 2 * H);
    if (p) {
        ps.assign(D * 3 * H + 16, 0.f);
        std::copy_n(p->data(), D * 3 * H, ps.data());
    }
    Layer L{cell, D, {direction == 1, direction == 2}, T, B, H, G, NP, seg1, I, NX,
            x.data(), wtp.data(), xb.data(), rt.data(), gb.data(), p ? ps.data() : nullptr,
            h0 ? h0->data() : nullptr, c0 ? c0->data() : nullptr,
            lens ? lens->data() : nullptr, out.data(), clip, input_forget, linear_before_reset};
    if (B == 0) return;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    // blocks of rows shared out between the threads
    const Kernel k = kernel(wide);
    in_threads(threads, (B + k.rows - 1) / k.rows, [&](i64 a, i64 b) { k.run(L, a, b); });
}

}  // namespace

void register_rnn_kernels(nb::module_ &m) {
    // noconvert: an array of another dtype or layout is a TypeError, never a silent copy
    // (a converted ``out`` would be written and thrown away)
    m.def("rnn", &rnn, nb::arg("cell"), nb::arg("direction"), nb::arg("x").noconvert(),
          nb::arg("wtp").noconvert(),
          nb::arg("rt").noconvert(), nb::arg("wb").noconvert(), nb::arg("rb").noconvert(),
          nb::arg("p").none().noconvert(), nb::arg("lens").none().noconvert(),
          nb::arg("h0").none().noconvert(), nb::arg("c0").none().noconvert(),
          nb::arg("out").noconvert(), nb::arg("clip"),
          nb::arg("input_forget"), nb::arg("linear_before_reset"), nb::arg("threads"),
          nb::arg("wide") = true,
          "One LSTM (cell 0) or GRU (cell 1) layer over ``x`` [T, B, I]: ``wtp`` [D, NX / 16, "
          "I, 16] W^T in panels of 16 columns (NX = G*H padded to 16), "
          "``rt`` [D, NP / 16, H, 16] R^T in panels "
          "of 16 columns, its gate segments padded to 16 columns (LSTM: i, o, f, c; GRU: z, r "
          "| h), biases ``wb``/``rb`` [D, "
          "G*H], optional peepholes ``p`` [D, 3H], int32 ``lens`` [B] (each in [0, T]), "
          "``h0``/``c0`` [D, B, H]; writes ``out`` [T + 2 (GRU: + 1), D, B, H] = Y, Y_h (, "
          "Y_c), zeros past each length (Y_h, Y_c of a length-0 row: zeros). direction: 0 forward, 1 reverse, 2 both; clip 0: "
          "none. The batch is shared between up to ``threads`` threads; the GIL is released. "
          "``wide`` False: the 8-lane kernel even where the CPU has AVX-512 (for tests). "
          "Every shape is checked first (ValueError; a wrong dtype or a non-C-contiguous array: "
          "TypeError).");
}
