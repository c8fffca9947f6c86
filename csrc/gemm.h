// The register-blocked product of the CPU device's kernels: C = A @ B (+ a second A @ B in the
// same pass) with B packed in panels of 16 columns ([ncols / 16, k, 16], each panel contiguous)
// and every row of C starting from a bias. Templates over the vector width: 8 lanes (AVX2 or the
// baseline) or 16 (AVX-512); the caller instantiates them in a function compiled for that width
// (rnn_kernels.cpp: the LSTM/GRU time loop; conv_kernels.cpp: dense layers; dense_kernels.cpp:
// chains of dense layers, an activation applied to the accumulators before they are stored).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#define GEMM_INLINE inline __attribute__((always_inline))
#define GEMM_INLINE_LAMBDA __attribute__((always_inline))

namespace offload::gemm {

using i64 = std::int64_t;

typedef float v8 __attribute__((vector_size(32)));
typedef std::int32_t v8i __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
typedef std::int32_t v16i __attribute__((vector_size(64)));

constexpr int kNR = 16;  // columns per panel of packed weights; packed segments are multiples of it

// The register block of the products for each vector width: MR batch rows (also the rows of a
// block of the time loop) x NB panels of kNR columns. 8 lanes (AVX2): 6 x 1 panel = 12 of the
// 16 ymm registers; 16 lanes (AVX-512): 12 x 2 panels = 24 of the 32 zmm registers, a panel's
// row each (the two panels streamed side by side). More rows, fewer passes over R^T per step:
// 12 x 2 was 4% faster than 8 x 3 and 6 x 4 on DeepJet's LSTM.
template <typename V> struct Tile;
template <> struct Tile<v8> { typedef v8i I; static constexpr int MR = 6, NB = 1; };
template <> struct Tile<v16> { typedef v16i I; static constexpr int MR = 12, NB = 2; };
template <typename V> constexpr int kLanes = sizeof(V) / sizeof(float);

template <typename V> GEMM_INLINE V load(const float *p) { V v; std::memcpy(&v, p, sizeof v); return v; }
template <typename V> GEMM_INLINE void store(float *p, V v) { std::memcpy(p, &v, sizeof v); }
template <typename V> GEMM_INLINE V splat(float x) { return V{} + x; }

// What a tile's accumulators go through on their way to memory: nothing (the LSTM's gates, the
// packed dense layers), or an activation applied in registers (dense_kernels.cpp's fused
// chains: ReLU, leaky ReLU, clip).
struct NoEpilogue {
    template <typename V> GEMM_INLINE V operator()(V v) const { return v; }
};

// A product's operands: A [rows, k] (rows lda apart) and B [k, ncols] packed in panels of kNR
// columns ([ncols / kNR, k, kNR], each panel contiguous: streamed in order).
struct Operands {
    const float *a;
    i64 lda;
    const float *b;
    i64 k;
};

// C[MR, NB * kNR] (columns j0...) = x.a @ x.b + y.a @ y.b over NB panels side by side, every
// row starting from bias (the biases of the gates, folded into the product). Two operands: the
// LSTM's step input and state in one pass over C (y.k = 0: none).
template <typename V, int MR, int NB, typename Ep = NoEpilogue>
GEMM_INLINE void gemm_tile(const Operands &x, const Operands &y, i64 j0, const float *bias,
                          float *C, i64 ldc, const Ep &ep = Ep()) {
    constexpr int W = kLanes<V>, NV = NB * kNR / W;  // vectors in a row of the tile
    // every loop but k's unrolled (the accumulators stay in registers; GCC would not unroll
    // 8 x 3 by itself and kept them in memory)
    V acc[MR][NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
        const V c = load<V>(bias + j0 + v * W);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][v] = c;
    }
    auto product = [&](const Operands &o) GEMM_INLINE_LAMBDA {
        const float *A = o.a, *B = o.b + j0 * o.k;
        const i64 K = o.k;
        for (i64 k = 0; k < K; ++k, B += kNR) {
            V b[NV];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) b[v] = load<V>(B + v * W / kNR * K * kNR + v * W % kNR);
#pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) {
                const float a = A[i * o.lda + k];  // one broadcast from memory
#pragma GCC unroll 8
                for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
            }
        }
    };
    product(x);
    product(y);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(C + i * ldc + j0 + v * W, ep(acc[i][v]));
}

// Columns [j0, ncols) by tiles of NB panels, the rest by tiles of NB / 2, ...
template <typename V, int MR, int NB, typename Ep = NoEpilogue>
GEMM_INLINE void gemm_cols(const Operands &x, const Operands &y, i64 j0, i64 ncols,
                          const float *bias, float *C, i64 ldc, const Ep &ep = Ep()) {
    for (; j0 + NB * kNR <= ncols; j0 += NB * kNR)
        gemm_tile<V, MR, NB>(x, y, j0, bias, C, ldc, ep);
    if constexpr (NB > 1)
        if (j0 < ncols) gemm_cols<V, MR, NB / 2>(x, y, j0, ncols, bias, C, ldc, ep);
}

// C[mr, ncols] = ep(bias + x.a @ x.b + y.a @ y.b), ncols a multiple of kNR, mr in
// [1, Tile<V>::MR].
// Few rows (batch 1): more panels per tile, so that 8 accumulators hide the FMAs' latency
// (one row x 2 panels waited on it: DeepJet's LSTM 10% slower at batch 1; 4 or 16 panels too).
template <typename V, int MR = Tile<V>::MR, typename Ep = NoEpilogue>
GEMM_INLINE void gemm_rows(int mr, const Operands &x, const Operands &y, i64 ncols,
                          const float *bias, float *C, i64 ldc, const Ep &ep = Ep()) {
    if constexpr (MR > 1)
        if (mr < MR) return gemm_rows<V, MR - 1, Ep>(mr, x, y, ncols, bias, C, ldc, ep);
    constexpr int NB = std::max(Tile<V>::NB, 8 * kLanes<V> / kNR / MR);
    gemm_cols<V, MR, NB>(x, y, 0, ncols, bias, C, ldc, ep);
}

inline i64 pad16(i64 n) { return (n + kNR - 1) / kNR * kNR; }

// Whether this CPU runs the 16-lane (AVX-512) kernels: the features their target attribute
// ("avx512f,avx512vl,avx512dq,fma,avx2") compiles for. Checked once.
inline bool has_avx512() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
    }();
    return yes;
}


}  // namespace offload::gemm
