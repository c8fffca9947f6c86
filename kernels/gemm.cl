/* gemm.cl: batched C = epilogue(A @ B) with a fused bias + residual + activation epilogue.
 *
 * A is [M, K] row-major (lda), B is [K, N] row-major (ldb), C is [M, N] row-major (ldc). The
 * batch (grid axis 2) is z = zo * G + zi; every operand's start moves by zo * s_o + zi * s_i, so
 * one launch covers batch x groups (grouped conv) and broadcast weights (stride 0).
 * Bias: bias_mode 0 none, 1 one value per column (dense), 2 one value per row (conv); the bias
 * start moves by zi * bias_gs. The residual R has C's layout and is added before the activation.
 */
#include "common.h"

#ifndef TM
#define TM 64        /* rows of C per work-group */
#endif
#ifndef TN
#define TN 64        /* columns of C per work-group */
#endif
#ifndef TK
#define TK 16        /* depth of one local-memory tile */
#endif
#ifndef WM
#define WM 4         /* rows per work-item (register block) */
#endif
#ifndef WN
#define WN 4         /* columns per work-item (register block) */
#endif
#define LX (TN / WN) /* work-group size along columns (axis 0) */
#define LY (TM / WM) /* work-group size along rows (axis 1) */
#define NT (LX * LY) /* work-items per work-group */
#if (TM * TK) % NT || (TK * TN) % NT || TM % WM || TN % WN
#error "gemm.cl: TM*TK and TK*TN must be multiples of (TM/WM)*(TN/WN), TM of WM, TN of WN"
#endif

DEVICE_FN float epilogue(float v, int m, int n, GLOBAL const real* bias, int bias_mode,
                         GLOBAL const real* res, int ldc, int act, float alpha, float lo,
                         float hi)
{
    if (bias_mode == 1) v += LD(bias, n);
    else if (bias_mode == 2) v += LD(bias, m);
    if (res) v += LD(res, m * ldc + n);
    return activate(v, act, alpha, lo, hi);
}

#ifndef DIRECT /* the CPU schedule builds gemm_direct alone (unrolled 6 x 32 blocks would make
                * this kernel's build take half a minute for nothing) */
/* Tiled GEMM for GPUs (GEMM_GPU): each work-group computes a TM x TN block of C from TK-deep
 * tiles of A and B staged in local memory, every work-item moving a fixed number of neighbouring
 * floats; each work-item holds a WM x WN register block whose rows are strided by LY and columns
 * by LX, so neighbouring work-items (axis 0) read neighbouring floats of B and write neighbouring
 * floats of C (coalesced), and read the same float of A (a broadcast). Launch: global
 * (ceil(N/TN)*LX, ceil(M/TM)*LY, batch), local (LX, LY, 1). */
KERNEL void gemm_tiled(GLOBAL const real* RESTRICT A, GLOBAL const real* RESTRICT B,
                       GLOBAL real* RESTRICT C, GLOBAL const real* RESTRICT bias,
                       GLOBAL const real* RESTRICT R,
                       int M, int N, int K, int lda, int ldb, int ldc, int G,
                       int sa_o, int sa_i, int sb_o, int sb_i, int sc_o, int sc_i, int bias_gs,
                       int bias_mode, int act, float alpha, float lo, float hi)
{
    LOCAL float As[TM][TK];
    LOCAL float Bs[TK][TN];
    const int tx = LID(0), ty = LID(1);
    const int col0 = GROUP(0) * TN, row0 = GROUP(1) * TM;
    const int z = GROUP(2), zo = z / G, zi = z - zo * G;
    A += zo * sa_o + zi * sa_i;
    B += zo * sb_o + zi * sb_i;
    C += zo * sc_o + zi * sc_i;
    const int tid = ty * LX + tx;

    float acc[WM][WN];
    UNROLL for (int i = 0; i < WM; ++i)
        UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
        /* stage A[row0:+TM, k0:+TK] and B[k0:+TK, col0:+TN], zero outside; every work-item
         * moves a fixed number of floats, neighbours neighbouring ones */
        UNROLL for (int s = 0; s < TM * TK / NT; ++s) {
            int e = tid + s * NT, r = e / TK, k = e - r * TK;
            int gr = row0 + r, gk = k0 + k;
            As[r][k] = (gr < M && gk < K) ? LD(A, gr * lda + gk) : 0.0f;
        }
        UNROLL for (int s = 0; s < TK * TN / NT; ++s) {
            int e = tid + s * NT, k = e / TN, c = e - k * TN;
            int gk = k0 + k, gc = col0 + c;
            Bs[k][c] = (gk < K && gc < N) ? LD(B, gk * ldb + gc) : 0.0f;
        }
        BARRIER();
        UNROLL for (int k = 0; k < TK; ++k) {
            float b[WN];
            UNROLL for (int j = 0; j < WN; ++j) b[j] = Bs[k][tx + j * LX];
            UNROLL for (int i = 0; i < WM; ++i) {
                float a = As[ty + i * LY][k];
                UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = MAD(a, b[j], acc[i][j]);
            }
        }
        BARRIER();
    }
    if (R) R += zo * sc_o + zi * sc_i;
    if (bias_mode) bias += zi * bias_gs;
    UNROLL for (int i = 0; i < WM; ++i) {
        int m = row0 + ty + i * LY;
        UNROLL for (int j = 0; j < WN; ++j) {
            int n = col0 + tx + j * LX;
            if (m < M && n < N)
                ST(C, m * ldc + n, epilogue(acc[i][j], m, n, bias, bias_mode, R, ldc, act,
                                            alpha, lo, hi));
        }
    }
}
#endif

/* Register-blocked GEMM for CPU devices (GEMM_CPU in drivers/opencl.py): no local memory and
 * no barrier. PoCL runs a work-group as loops over its work-items and keeps every value that
 * lives across a barrier in per-work-item memory; with gemm_tiled's barriers that includes the
 * local-tile addresses, and the work-item loop then does not vectorise (5-35 GFLOP/s, 512^3).
 * Here each work-item keeps a WM x WN block of C in registers over the whole K loop: WN adjacent
 * columns (SIMD vectors: WN = 32 is two AVX-512 registers per row) times WM adjacent rows, read
 * straight from global memory (the caches do the tiling; the work-group's TM x TN block keeps
 * neighbouring work-items on the same columns of B). Columns past N take a second loop with
 * clamped loads; rows past M read row M-1 and are not stored. Launch as gemm_tiled. */
KERNEL void gemm_direct(GLOBAL const real* RESTRICT A, GLOBAL const real* RESTRICT B,
                        GLOBAL real* RESTRICT C, GLOBAL const real* RESTRICT bias,
                       GLOBAL const real* RESTRICT R,
                       int M, int N, int K, int lda, int ldb, int ldc, int G,
                       int sa_o, int sa_i, int sb_o, int sb_i, int sc_o, int sc_i, int bias_gs,
                       int bias_mode, int act, float alpha, float lo, float hi)
{
    const int n0 = GID(0) * WN, m0 = GID(1) * WM;
    const int z = GROUP(2), zo = z / G, zi = z - zo * G;
    if (m0 >= M || n0 >= N) return;
    A += zo * sa_o + zi * sa_i;
    B += zo * sb_o + zi * sb_i;
    C += zo * sc_o + zi * sc_i;
    float acc[WM][WN];
    UNROLL for (int i = 0; i < WM; ++i)
        UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = 0.0f;
    GLOBAL const real* a[WM];
    UNROLL for (int i = 0; i < WM; ++i) a[i] = A + (m0 + i < M ? m0 + i : M - 1) * lda;
    if (n0 + WN <= N) {
        GLOBAL const real* b = B + n0;
        for (int k = 0; k < K; ++k, b += ldb) {
            float bv[WN];
            UNROLL for (int j = 0; j < WN; ++j) bv[j] = LD(b, j);
            UNROLL for (int i = 0; i < WM; ++i) {
                float av = LD(a[i], k);
                UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = MAD(av, bv[j], acc[i][j]);
            }
        }
    } else {
        for (int k = 0; k < K; ++k) {
            float bv[WN];
            UNROLL for (int j = 0; j < WN; ++j)
                bv[j] = LD(B, k * ldb + (n0 + j < N ? n0 + j : N - 1));
            UNROLL for (int i = 0; i < WM; ++i) {
                float av = LD(a[i], k);
                UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = MAD(av, bv[j], acc[i][j]);
            }
        }
    }
    if (R) R += zo * sc_o + zi * sc_i;
    if (bias_mode) bias += zi * bias_gs;
    UNROLL for (int i = 0; i < WM; ++i) {
        int m = m0 + i;
        UNROLL for (int j = 0; j < WN; ++j) {
            int n = n0 + j;
            if (m < M && n < N)
                ST(C, m * ldc + n, epilogue(acc[i][j], m, n, bias, bias_mode, R, ldc, act,
                                            alpha, lo, hi));
        }
    }
}

/* Naive GEMM, one output per work-item (the benchmark's baseline; same arguments). */
KERNEL void gemm_naive(GLOBAL const real* RESTRICT A, GLOBAL const real* RESTRICT B,
                       GLOBAL real* RESTRICT C, GLOBAL const real* RESTRICT bias,
                       GLOBAL const real* RESTRICT R,
                       int M, int N, int K, int lda, int ldb, int ldc, int G,
                       int sa_o, int sa_i, int sb_o, int sb_i, int sc_o, int sc_i, int bias_gs,
                       int bias_mode, int act, float alpha, float lo, float hi)
{
    const int n = GID(0), m = GID(1);
    const int z = GROUP(2), zo = z / G, zi = z - zo * G;
    if (m >= M || n >= N) return;
    A += zo * sa_o + zi * sa_i;
    B += zo * sb_o + zi * sb_i;
    C += zo * sc_o + zi * sc_i;
    if (R) R += zo * sc_o + zi * sc_i;
    if (bias_mode) bias += zi * bias_gs;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc = MAD(LD(A, m * lda + k), LD(B, k * ldb + n), acc);
    ST(C, m * ldc + n, epilogue(acc, m, n, bias, bias_mode, R, ldc, act, alpha, lo, hi));
}
