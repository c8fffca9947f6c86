/* index.cl: ops driven by run-time indices (Gather, GatherElements, GatherND, ScatterND) and
 * TopK's selection. Data of the plan's float storage (`real`) by default, or integer/bool data
 * moved as it is when compiled with -DDATA_T=i64/int/u8; indices int64, or int32 with
 * -DINDEX_T=int. A negative index counts from the end; one still outside the axis writes its
 * flat position + 1 into err[slot] (the plan reads the flags after the run and raises a typed
 * error naming node, index and axis size) and the element read is 0 / NaN. */
#include "common.h"

#define NAN_F AS_FLOAT(0x7fc00000u)

#ifdef DATA_T
typedef DATA_T data_t;
typedef DATA_T value_t; /* TopK compares integers as integers */
#define LDD(p, i) ((p)[i])
#define STD(p, i, v) ((p)[i] = (v))
#define MISSING ((data_t)0)
#else
typedef real data_t;
typedef float value_t;
#define LDD(p, i) LD(p, i)
#define STD(p, i, v) ST(p, i, v)
#define MISSING NAN_F
#endif
#ifdef INDEX_T
typedef INDEX_T index_t;
#else
typedef i64 index_t;
#endif

/* y[o, j, i] = x[o, idx[j], i]: x viewed as [outer, A, inner], the indices flat (J of them). */
KERNEL void gather_axis(GLOBAL const data_t* RESTRICT x, GLOBAL const index_t* RESTRICT idx,
                        GLOBAL data_t* RESTRICT y, int total, int A, int J, int inner,
                        GLOBAL int* err, int slot)
{
    int t = GID(0);
    if (t >= total) return;
    int i = t % inner, r = t / inner;
    int j = r % J, o = r / J;
    i64 k = idx[j];
    if (k < 0) k += A;
    bool inside = k >= 0 && k < A;
    if (!inside) err[slot] = j + 1;
    STD(y, t, inside ? LDD(x, (o * A + (int)k) * inner + i) : MISSING);
}

/* y[c] = x[c with coordinate `ax` replaced by idx[c]]: y and idx contiguous over dims d0..d5,
 * x strides s0..s5 (rank padded to 6), A = x's size along ax. */
KERNEL void gather_elements6(GLOBAL const data_t* RESTRICT x, GLOBAL const index_t* RESTRICT idx,
                             GLOBAL data_t* RESTRICT y, int total, int ax, int A,
                             int d0, int d1, int d2, int d3, int d4, int d5,
                             int s0, int s1, int s2, int s3, int s4, int s5,
                             GLOBAL int* err, int slot)
{
    int t = GID(0);
    if (t >= total) return;
    i64 k = idx[t];
    if (k < 0) k += A;
    bool inside = k >= 0 && k < A;
    if (!inside) { err[slot] = t + 1; k = 0; }
    int kk = (int)k, r = t, ix = 0, c;
    c = r % d5; r /= d5; ix += (ax == 5 ? kk : c) * s5;
    c = r % d4; r /= d4; ix += (ax == 4 ? kk : c) * s4;
    c = r % d3; r /= d3; ix += (ax == 3 ? kk : c) * s3;
    c = r % d2; r /= d2; ix += (ax == 2 ? kk : c) * s2;
    c = r % d1; r /= d1; ix += (ax == 1 ? kk : c) * s1;
    c = r % d0;          ix += (ax == 0 ? kk : c) * s0;
    STD(y, t, inside ? LDD(x, ix) : MISSING);
}

/* The indices of the K largest (largest = 1) or smallest values of x[o, :, i] (x viewed as
 * [outer, R, inner]) in order, ties to the lower index (onnxruntime's order): y [outer, K,
 * inner]. Each step takes the best element ordered after the previous one: O(K * R), no memory. */
KERNEL void topk_indices(GLOBAL const data_t* RESTRICT x, GLOBAL i64* RESTRICT y, int total,
                         int R, int K, int inner, int largest)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    int base = o * R * inner + i;
    value_t pv = 0;
    int pi = -1;
    for (int j = 0; j < K; ++j) {
        int bi = -1;
        value_t bv = 0;
        for (int r = 0; r < R; ++r) {
            value_t v = LDD(x, base + r * inner);
            if (pi >= 0) {
                bool after = largest ? (v < pv || (v == pv && r > pi))
                                     : (v > pv || (v == pv && r > pi));
                if (!after) continue;
            }
            if (bi < 0 || (largest ? v > bv : v < bv)) { bi = r; bv = v; }
        }
        y[(o * K + j) * inner + i] = (i64)bi;
        pv = bv;
        pi = bi;
    }
}

/* GatherND (batch_dims 0): y[o, i] = x[lin(o), i], lin(o) = sum_j idx[o, j] * w_j over the first
 * q axes of x (sizes a0..a5, weights w0..w5 in rows of `inner` elements); y viewed as
 * [outer, inner]. */
KERNEL void gather_nd(GLOBAL const data_t* RESTRICT x, GLOBAL const index_t* RESTRICT idx,
                      GLOBAL data_t* RESTRICT y, int total, int inner, int q,
                      int a0, int a1, int a2, int a3, int a4, int a5,
                      int w0, int w1, int w2, int w3, int w4, int w5,
                      GLOBAL int* err, int slot)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    int sizes[6] = {a0, a1, a2, a3, a4, a5}, weights[6] = {w0, w1, w2, w3, w4, w5};
    int lin = 0;
    bool inside = true;
    for (int j = 0; j < q; ++j) {
        i64 k = idx[o * q + j];
        if (k < 0) k += sizes[j];
        if (k < 0 || k >= sizes[j]) {
            inside = false;
            if (i == 0) err[slot] = o * q + j + 1;
        }
        lin += (int)k * weights[j];
    }
    STD(y, t, inside ? LDD(x, lin * inner + i) : MISSING);
}

/* CumSum along r of x[o, r, i] (x viewed as [outer, R, inner]), optionally exclusive and/or
 * from the end; one work-item per (o, i). */
KERNEL void cumsum_axis(GLOBAL const data_t* RESTRICT x, GLOBAL data_t* RESTRICT y, int total,
                        int R, int inner, int exclusive, int reverse)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    value_t acc = 0;
    for (int r = 0; r < R; ++r) {
        int at = (o * R + (reverse ? R - 1 - r : r)) * inner + i;
        value_t v = LDD(x, at);
        if (exclusive) { STD(y, at, acc); acc += v; }
        else { acc += v; STD(y, at, acc); }
    }
}

/* ScatterND (reduction none), after y = copy of the data: y[lin(o), i] = u[o, i], lin(o) as in
 * gather_nd; an index outside the data is skipped (and flagged). One work-item per element of u. */
KERNEL void scatter_nd(GLOBAL const index_t* RESTRICT idx, GLOBAL const data_t* RESTRICT u,
                       GLOBAL data_t* RESTRICT y, int total, int inner, int q,
                       int a0, int a1, int a2, int a3, int a4, int a5,
                       int w0, int w1, int w2, int w3, int w4, int w5,
                       GLOBAL int* err, int slot)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    int sizes[6] = {a0, a1, a2, a3, a4, a5}, weights[6] = {w0, w1, w2, w3, w4, w5};
    int lin = 0;
    bool inside = true;
    for (int j = 0; j < q; ++j) {
        i64 k = idx[o * q + j];
        if (k < 0) k += sizes[j];
        if (k < 0 || k >= sizes[j]) {
            inside = false;
            if (i == 0) err[slot] = o * q + j + 1;
        }
        lin += (int)k * weights[j];
    }
    if (inside) STD(y, lin * inner + i, LDD(u, t));
}
