// Chains of dense layers run as one kernel (offload/drivers/cpu.py build_dense, fused by
// offload/fusions.py _fuse_dense_chain): y = f_L(... f_2(f_1(x))) with f_i(v) = act_i(v @ W_i +
// b_i), where each intermediate is read only by the next layer. A block of rows goes through
// every layer before the next block, its intermediates in two per-thread buffers sized to stay
// in L1/L2, so they never go out to memory and back: a HEP MLP's 16 -> 64 first layer wrote
// 4 bytes for every byte it read, and every later layer read that back.
//
// The products are gemm.h's register-blocked tiles over weights packed in panels of 16 columns
// (pack_columns, as _core.dense_packed takes them), 16 lanes on AVX-512 (picked at run time:
// gemm::has_avx512) else 8 (AVX2 or the baseline, one clone per x86-64 level). ReLU, leaky ReLU
// and clip are applied to the accumulators before they are stored; sigmoid and tanh to the
// block's rows while they are in cache. Blocks of rows are shared out over the pool.
//
// Everything is checked (shapes, packed layouts, layer widths, activation codes, overlaps)
// before memory is touched.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "gemm.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using i64 = std::int64_t;
using offload::shape_of;
using namespace offload::gemm;

// Same codes as offload/drivers/cpu.py ACTIVATION_CODES.
enum Activation : int { kIdentity = 0, kRelu, kLeakyRelu, kSigmoid, kTanh, kClip };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CHAIN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CHAIN_CLONES
#endif

constexpr int kMaxLayers = 64;
constexpr i64 kMaxWidth = 1 << 16;  // columns of one layer (its rows of a block are in cache)
constexpr i64 kRowAlign = 12;       // blocks are whole register blocks (12 rows; 6 on AVX2)
constexpr i64 kMaxBlock = 384;

// The activations applied to the accumulators before they are stored, with the bits of
// cpu_kernels.cpp's Epilogue and conv_kernels.cpp's finish_row (NaN kept; ReLU(-0) = +0,
// leaky(-0) = -0). Each is one comparison and a select (max/min): these helpers are compiled
// for the baseline and inlined into the AVX-512 function, where GCC 12 keeps that whole but
// splits two comparisons or'ed together (v > 0 | v != v) into scalar ones (a 10x slower ReLU
// layer).
struct Relu {
    template <typename V> GEMM_INLINE V operator()(V v) const {
        v = v < V{} ? V{} : v;  // (NaN compares false: it stays)
        return v + 0.0f;        // -0 + 0 = +0
    }
};
struct LeakyRelu {
    float alpha;
    template <typename V> GEMM_INLINE V operator()(V v) const { return v >= V{} ? v : v * alpha; }
};
struct Clip {
    float lo, hi;
    template <typename V> GEMM_INLINE V operator()(V v) const {
        const V l = splat<V>(lo), h = splat<V>(hi);
        v = v < l ? l : v;  // (NaN compares false twice: it stays)
        return v > h ? h : v;
    }
};

struct Layer {
    const float *w;  // packed [npad / 16, k, 16]
    const float *bias;  // npad values, zeros past n
    i64 k, n, npad;
    int act;
    float alpha, lo, hi;
};

struct ChainJob {
    const Layer *layers;
    int count;
    const float *x;
    float *y;
    i64 block;  // rows per block (a multiple of kRowAlign)
    i64 width;  // the widest npad: each of the two buffers holds block x width
};

// Rows [0, rows) of one layer: out[r, :npad] = act(in[r, :k] @ W + b).
template <typename V, typename Ep>
GEMM_INLINE void layer_rows(const Layer &L, const float *in, i64 ldin, i64 rows, float *out,
                            i64 ldout, const Ep &ep) {
    constexpr int MR = Tile<V>::MR;
    const Operands none{nullptr, 0, nullptr, 0};
    for (i64 r = 0; r < rows; r += MR) {
        const int mr = (int) std::min<i64>(MR, rows - r);
        gemm_rows<V, MR, Ep>(mr, Operands{in + r * ldin, ldin, L.w, L.k}, none, L.npad, L.bias,
                             out + r * ldout, ldout, ep);
    }
}

template <typename V>
GEMM_INLINE void layer(const Layer &L, const float *in, i64 ldin, i64 rows, float *out,
                       i64 ldout) {
    switch (L.act) {
    case kRelu: layer_rows<V>(L, in, ldin, rows, out, ldout, Relu{}); return;
    case kLeakyRelu: layer_rows<V>(L, in, ldin, rows, out, ldout, LeakyRelu{L.alpha}); return;
    case kClip: layer_rows<V>(L, in, ldin, rows, out, ldout, Clip{L.lo, L.hi}); return;
    default: layer_rows<V>(L, in, ldin, rows, out, ldout, NoEpilogue{}); break;
    }
    // sigmoid and tanh over the block's rows, in cache
    if (L.act == kSigmoid)
        for (i64 r = 0; r < rows; ++r)
            for (float *o = out + r * ldout, *e = o + L.n; o < e; ++o) *o = 1.f / (1.f + std::exp(-*o));
    else if (L.act == kTanh)
        for (i64 r = 0; r < rows; ++r)
            for (float *o = out + r * ldout, *e = o + L.n; o < e; ++o) *o = std::tanh(*o);
}

float *chain_scratch(std::size_t floats) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < floats) buffer.resize(floats);
    return buffer.data();
}

// Rows [r0, r1) through every layer, a block at a time.
template <typename V>
GEMM_INLINE void chain_rows(const ChainJob &j, i64 r0, i64 r1) {
    const i64 span = j.block * j.width;
    float *buffers = chain_scratch((std::size_t) (2 * span));
    const Layer &last = j.layers[j.count - 1];
    for (i64 r = r0; r < r1; r += j.block) {
        const i64 rows = std::min(j.block, r1 - r);
        const float *in = j.x + r * j.layers[0].k;
        i64 ldin = j.layers[0].k;
        for (int l = 0; l < j.count; ++l) {
            const Layer &L = j.layers[l];
            float *out = buffers + (l & 1) * span;
            i64 ldout = L.npad;
            if (l == j.count - 1 && L.n == L.npad) {  // whole panels: straight into y
                out = j.y + r * L.n;
                ldout = L.n;
            }
            layer<V>(L, in, ldin, rows, out, ldout);
            in = out;
            ldin = ldout;
        }
        if (last.n != last.npad)
            for (i64 i = 0; i < rows; ++i)
                std::memcpy(j.y + (r + i) * last.n, in + i * ldin, (std::size_t) last.n * sizeof(float));
    }
}

__attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2")))
void chain_avx512(const ChainJob &j, i64 r0, i64 r1) { chain_rows<v16>(j, r0, r1); }
CHAIN_CLONES void chain_v8(const ChainJob &j, i64 r0, i64 r1) { chain_rows<v8>(j, r0, r1); }

// Rows per block: the two buffers of block x widest-npad floats within ~96 KiB, in L2 beside
// the weights (a register block's input and output rows in L1); whole register blocks, 12 to
// 384 rows. (jet_mlp: 192 rows, hcal_mlp: 48; 48 to 192 measured the same on both.)
i64 auto_block(i64 width) {
    const i64 fit = (96 << 10) / (2 * 4 * std::max<i64>(width, kNR));
    return std::clamp<i64>(fit / kRowAlign * kRowAlign, kRowAlign, kMaxBlock);
}

// A chain of dense layers, checked once and bound to its x and out (the plan's step): run()
// computes out from x. The object holds every array it was given (the weights, x and out), so
// run() never reads memory that was freed; none is converted (a converted copy would be a
// temporary that the next run() would still read).
class DenseChain {
  public:
    DenseChain(In x, std::vector<In> w, std::vector<std::optional<In>> bias, Out y,
               std::vector<int> act, std::vector<float> alpha, std::vector<float> lo,
               std::vector<float> hi, i64 block_rows, int lanes, const char *fn = "DenseChain")
        : x_(x), w_(std::move(w)), y_(y) {
        const std::string f(fn);
        const size_t count = w_.size();
        OFFLOAD_CHECK(count >= 1 && count <= (size_t) kMaxLayers,
              f + ": expected 1 to " + std::to_string(kMaxLayers) + " layers, got " +
                  std::to_string(count));
        OFFLOAD_CHECK(bias.size() == count && act.size() == count && alpha.size() == count &&
                  lo.size() == count && hi.size() == count,
              f + ": expected one bias (or None), act, alpha, lo and hi per layer (" +
                  std::to_string(count) + " layers), got " + std::to_string(bias.size()) +
                  " biases, " + std::to_string(act.size()) + " acts, " +
                  std::to_string(alpha.size()) + " alphas, " + std::to_string(lo.size()) +
                  " los, " + std::to_string(hi.size()) + " his");
        OFFLOAD_CHECK(x.ndim() == 2 && y.ndim() == 2,
              f + ": expected x [rows, k] and out [rows, n], got x " + shape_of(x) + ", out " +
                  shape_of(y));
        rows_ = (i64) x.shape(0);
        OFFLOAD_CHECK((i64) y.shape(0) == rows_,
              f + ": x " + shape_of(x) + " and out " + shape_of(y) + " have different rows");
        OFFLOAD_CHECK(block_rows >= 0 && block_rows <= kMaxBlock,
              f + ": block_rows must be 0 (chosen here) to " + std::to_string(kMaxBlock) +
                  ", got " + std::to_string(block_rows));
        for (size_t l = 0; l < count; ++l)
            OFFLOAD_CHECK(w_[l].ndim() == 3 && w_[l].shape(2) == (size_t) kNR,
                  f + ": layer " + std::to_string(l) + ": expected w packed [npad / 16, k, 16], got " +
                      shape_of(w_[l]));
        check_apart(f, "x", x);
        i64 k = (i64) x.shape(1), width = 0;
        layers_.resize(count);
        biases_.resize(count);
        for (size_t l = 0; l < count; ++l) {
            const In &wl = w_[l];
            const std::string at = f + ": layer " + std::to_string(l) + ": ";
            const i64 npad = (i64) wl.shape(0) * kNR;
            OFFLOAD_CHECK((i64) wl.shape(1) == k,
                  at + "w packed " + shape_of(wl) + " takes " + std::to_string(wl.shape(1)) +
                      " inputs, " + (l ? "the layer before gives " : "x has ") +
                      std::to_string(k));
            // the width of this layer: the inputs of the next one, or out's columns
            const i64 n = l + 1 < count ? (i64) w_[l + 1].shape(1) : (i64) y.shape(1);
            OFFLOAD_CHECK(n <= npad && npad - n < kNR,
                  at + "w packed " + shape_of(wl) + " holds " + std::to_string(npad) +
                      " columns, for the " + std::to_string(n) + " " +
                      (l + 1 < count ? "inputs of the next layer" : "columns of out") +
                      " (expected " + std::to_string(n) + " padded to a multiple of 16: " +
                      std::to_string(pad16(n)) + ")");
            OFFLOAD_CHECK(npad <= kMaxWidth, at + std::to_string(npad) + " columns; a chain takes up to " +
                                         std::to_string(kMaxWidth));
            OFFLOAD_CHECK(!bias[l] || (i64) bias[l]->size() == n,
                  at + "bias must have " + std::to_string(n) + " values, got " +
                      (bias[l] ? std::to_string(bias[l]->size()) : std::string("none")));
            OFFLOAD_CHECK(act[l] >= kIdentity && act[l] <= kClip,
                  at + "activation code must be 0..5, got " + std::to_string(act[l]));
            OFFLOAD_CHECK(product(rows_, k, npad) >= 0, at + "sizes too large");
            check_apart(f, "w[" + std::to_string(l) + "]", wl);
            if (bias[l]) check_apart(f, "bias[" + std::to_string(l) + "]", *bias[l]);
            biases_[l].assign((size_t) npad, 0.f);
            if (bias[l]) std::copy(bias[l]->data(), bias[l]->data() + n, biases_[l].begin());
            layers_[l] = Layer{wl.data(), biases_[l].data(), k, n, npad, act[l], alpha[l], lo[l],
                               hi[l]};
            macs_ += k * npad;
            width = std::max(width, npad);
            k = n;
        }
        OFFLOAD_CHECK(lanes == 0 || lanes == 8 || (lanes == 16 && has_avx512()),
              f + ": lanes must be 0 (the widest this CPU runs), 8 or 16 (with AVX-512), got " +
                  std::to_string(lanes));
        wide_ = lanes == 0 ? has_avx512() : lanes == 16;
        block_ = block_rows ? (block_rows + kRowAlign - 1) / kRowAlign * kRowAlign
                            : auto_block(width);
        width_ = width;
        row_macs_ = macs_;
        macs_ = product(macs_, rows_);
    }

    void run() {  // called without the GIL: touches only raw data, never the handles' counts
        if (rows_ == 0 || y_.size() == 0) return;
        offload::FlushDenormals ftz;
        const ChainJob j{layers_.data(), (int) layers_.size(), x_.data(), y_.data(), block_, width_};
        auto *kernel = wide_ ? chain_avx512 : chain_v8;
        // Parallel from 4x the pool's threshold (set_parallel_macs): the chain does ~60
        // multiply-adds per ns on one AVX-512 core, and waking a helper cost more than it saved
        // below that (jet_mlp at 512 rows: 44 us on 2 threads, 32 on one; at 1024 rows even).
        const bool parallel = macs_ < 0 || macs_ / 4 >= offload::parallel_macs();
        // Tasks: blocks of rows (several per thread, for threads slowed by other work), but
        // each at least ~2**20 multiply-adds: every task reads all the weights into its core's
        // cache (hcal_mlp at 64 rows in tasks of 12 rows took 1.5x its single-thread time).
        i64 step = rows_;
        if (parallel) {
            const auto up = [](i64 r) { return (r + kRowAlign - 1) / kRowAlign * kRowAlign; };
            const i64 parts = 4 * (i64) offload::pool_threads();
            const i64 least = up(((i64(1) << 20) + row_macs_ - 1) / std::max<i64>(row_macs_, 1));
            step = std::max(least, std::min(block_, up((rows_ + parts - 1) / parts)));
        }
        offload::parallel_for((rows_ + step - 1) / step, [&](i64 i) {
            kernel(j, i * step, std::min(rows_, (i + 1) * step));
        }, parallel);
    }

    i64 block_rows() const { return block_; }
    int lanes() const { return wide_ ? 16 : 8; }

  private:
    static i64 product(i64 a, i64 b, i64 c = 1) {
        i64 p = 1;
        for (i64 d : {a, b, c}) {
            if (d < 0) return -1;
            if (d && p > (i64(1) << 62) / d) return -1;
            p *= d;
        }
        return p;
    }

    // out must not share memory with what it reads (it would be read after being written)
    template <typename A> void check_apart(const std::string &fn, const std::string &what, const A &in) {
        offload::check_apart(fn, what, y_, in);
    }

    In x_;
    std::vector<In> w_;
    Out y_;
    std::vector<Layer> layers_;
    std::vector<std::vector<float>> biases_;
    i64 rows_ = 0, block_ = kRowAlign, width_ = 0, macs_ = 0, row_macs_ = 0;
    bool wide_ = false;
};

// One call: the chain checked, then run (x and the weights may be converted copies here).
void dense_chain(In x, std::vector<In> w, std::vector<std::optional<In>> bias, Out y,
                 std::vector<int> act, std::vector<float> alpha, std::vector<float> lo,
                 std::vector<float> hi, i64 block_rows, int lanes) {
    DenseChain chain(x, std::move(w), std::move(bias), y, std::move(act), std::move(alpha),
                     std::move(lo), std::move(hi), block_rows, lanes, "dense_chain");
    nb::gil_scoped_release release;
    chain.run();
}

}  // namespace

void register_dense_kernels(nb::module_ &m) {
    m.def("dense_chain", &dense_chain, nb::arg("x"), nb::arg("w_packed"), nb::arg("bias"),
          nb::arg("out").noconvert(), nb::arg("act"), nb::arg("alpha"), nb::arg("lo"),
          nb::arg("hi"), nb::arg("block_rows") = 0, nb::arg("lanes") = 0,
          "out = f_L(... f_1(x)), f_i(v) = act_i(v @ w_i + bias_i), each w_i packed [ceil(n_i / "
          "16), k_i, 16] (zeros past n_i); blocks of block_rows rows (0: chosen from the widths) "
          "through every layer, the intermediates in cache, on the pool. lanes: 0 the widest "
          "kernel this CPU runs, 8 the AVX2/baseline one, 16 the AVX-512 one.");
    nb::class_<DenseChain>(m, "DenseChain",
                           "dense_chain checked once and bound to x and out; run() computes out.")
        .def(nb::init<In, std::vector<In>, std::vector<std::optional<In>>, Out, std::vector<int>,
                      std::vector<float>, std::vector<float>, std::vector<float>, i64, int>(),
             nb::arg("x").noconvert(), nb::arg("w_packed").noconvert(),
             nb::arg("bias").noconvert(), nb::arg("out").noconvert(), nb::arg("act"),
             nb::arg("alpha"), nb::arg("lo"), nb::arg("hi"), nb::arg("block_rows") = 0,
             nb::arg("lanes") = 0)
        .def("run", &DenseChain::run, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("block_rows", &DenseChain::block_rows)
        .def_prop_ro("lanes", &DenseChain::lanes);
}
