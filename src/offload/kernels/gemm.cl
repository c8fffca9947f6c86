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
/* Which rows/columns a work-item owns: strided by the work-group size (GPUs: neighbouring
 * work-items touch neighbouring addresses) or, with CONTIGUOUS_BLOCK (CPUs), WM x WN adjacent
 * ones so that the compiler turns each register-block row into one SIMD vector. */
#ifdef CONTIGUOUS_BLOCK
#define ROW_OF(t, i) ((t) * WM + (i))
#define COL_OF(t, j) ((t) * WN + (j))
#else
#define ROW_OF(t, i) ((t) + (i) * LY)
#define COL_OF(t, j) ((t) + (j) * LX)
#endif

DEVICE_FN float epilogue(float v, int m, int n, GLOBAL const float* bias, int bias_mode,
                         GLOBAL const float* res, int ldc, int act, float alpha, float lo,
                         float hi)
{
    if (bias_mode == 1) v += bias[n];
    else if (bias_mode == 2) v += bias[m];
    if (res) v += res[m * ldc + n];
    return activate(v, act, alpha, lo, hi);
}

/* Tiled GEMM: each work-group computes a TM x TN block of C from TK-deep tiles of A and B staged
 * in local memory; each work-item holds a WM x WN register block, its rows and columns strided
 * by the work-group size so neighbouring work-items touch neighbouring addresses (coalesced on
 * GPUs, vectorised across work-items by PoCL). Launch: global (ceil(N/TN)*LX, ceil(M/TM)*LY,
 * batch), local (LX, LY, 1). */
KERNEL void gemm_tiled(GLOBAL const float* RESTRICT A, GLOBAL const float* RESTRICT B,
                       GLOBAL float* RESTRICT C, GLOBAL const float* RESTRICT bias,
                       GLOBAL const float* RESTRICT R,
                       int M, int N, int K, int lda, int ldb, int ldc, int G,
                       int sa_o, int sa_i, int sb_o, int sb_i, int sc_o, int sc_i, int bias_gs,
                       int bias_mode, int act, float alpha, float lo, float hi)
{
    LOCAL float As[TK][TM];   /* A tile, transposed: As[k][m] */
    LOCAL float Bs[TK][TN];
    const int tx = LID(0), ty = LID(1);
    const int col0 = GROUP(0) * TN, row0 = GROUP(1) * TM;
    const int z = GROUP(2), zo = z / G, zi = z - zo * G;
    A += zo * sa_o + zi * sa_i;
    B += zo * sb_o + zi * sb_i;
    C += zo * sc_o + zi * sc_i;
    if (R) R += zo * sc_o + zi * sc_i;
    if (bias_mode) bias += zi * bias_gs;
    const int tid = ty * LX + tx;

    float acc[WM][WN];
    UNROLL for (int i = 0; i < WM; ++i)
        UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
        /* stage A[row0:row0+TM, k0:k0+TK] and B[k0:k0+TK, col0:col0+TN], zero outside */
        for (int e = tid; e < TM * TK; e += LX * LY) {
            int r = e / TK, k = e - r * TK;
            int gr = row0 + r, gk = k0 + k;
            As[k][r] = (gr < M && gk < K) ? A[gr * lda + gk] : 0.0f;
        }
        for (int e = tid; e < TK * TN; e += LX * LY) {
            int k = e / TN, c = e - k * TN;
            int gk = k0 + k, gc = col0 + c;
            Bs[k][c] = (gk < K && gc < N) ? B[gk * ldb + gc] : 0.0f;
        }
        BARRIER();
        UNROLL for (int k = 0; k < TK; ++k) {
            float a[WM], b[WN];
            UNROLL for (int i = 0; i < WM; ++i) a[i] = As[k][ROW_OF(ty, i)];
            UNROLL for (int j = 0; j < WN; ++j) b[j] = Bs[k][COL_OF(tx, j)];
            UNROLL for (int i = 0; i < WM; ++i)
                UNROLL for (int j = 0; j < WN; ++j) acc[i][j] = MAD(a[i], b[j], acc[i][j]);
        }
        BARRIER();
    }
    UNROLL for (int i = 0; i < WM; ++i) {
        int m = row0 + ROW_OF(ty, i);
        UNROLL for (int j = 0; j < WN; ++j) {
            int n = col0 + COL_OF(tx, j);
            if (m < M && n < N)
                C[m * ldc + n] = epilogue(acc[i][j], m, n, bias, bias_mode, R, ldc, act, alpha,
                                          lo, hi);
        }
    }
}

/* Naive GEMM, one output per work-item (the benchmark's baseline; same arguments). */
KERNEL void gemm_naive(GLOBAL const float* RESTRICT A, GLOBAL const float* RESTRICT B,
                       GLOBAL float* RESTRICT C, GLOBAL const float* RESTRICT bias,
                       GLOBAL const float* RESTRICT R,
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
    for (int k = 0; k < K; ++k) acc = MAD(A[m * lda + k], B[k * ldb + n], acc);
    C[m * ldc + n] = epilogue(acc, m, n, bias, bias_mode, R, ldc, act, alpha, lo, hi);
}
