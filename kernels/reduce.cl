/* reduce.cl: reductions and softmax over one axis block of x viewed as [outer, R, inner]. One
 * work-item per (outer, inner) output element. */
#include "common.h"

#define RED_SUM 0
#define RED_MEAN 1
#define RED_MAX 2
#define RED_MIN 3
#define RED_PROD 4

/* y[o * inner + i] = reduce_r x[(o * R + r) * inner + i] */
KERNEL void reduce_axis(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int total,
                        int R, int inner, int fn)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    GLOBAL const real* p = x + o * R * inner + i;
    float acc = fn == RED_MAX ? -INF_F : fn == RED_MIN ? INF_F : fn == RED_PROD ? 1.0f : 0.0f;
    if (fn == RED_MAX) {
        for (int r = 0; r < R; ++r) acc = max_nan(acc, LD(p, r * inner));
    } else if (fn == RED_MIN) {
        for (int r = 0; r < R; ++r) { float v = LD(p, r * inner); acc = (v != v || v < acc) ? v : acc; }
    } else if (fn == RED_PROD) {
        for (int r = 0; r < R; ++r) acc *= LD(p, r * inner);
    } else {
        for (int r = 0; r < R; ++r) acc += LD(p, r * inner);
        if (fn == RED_MEAN) acc /= (float)R;
    }
    ST(y, t, acc);
}

/* softmax over r of x[o, r, i]: exp(x - max) / sum(exp(x - max)) */
KERNEL void softmax_axis(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int total,
                         int R, int inner)
{
    int t = GID(0);
    if (t >= total) return;
    int o = t / inner, i = t - o * inner;
    int base = o * R * inner + i;
    float m = -INF_F;
    for (int r = 0; r < R; ++r) m = max_nan(m, LD(x, base + r * inner));
    float s = 0.0f;
    for (int r = 0; r < R; ++r) s += EXP(LD(x, base + r * inner) - m);
    for (int r = 0; r < R; ++r) ST(y, base + r * inner, EXP(LD(x, base + r * inner) - m) / s);
}

/* LayerNormalization of each row of x viewed as [rows, D]: (x - mean) / sqrt(var + eps) * scale
 * + bias (scale and bias: D values; bias may be null). One work-item per row. */
KERNEL void layernorm_rows(GLOBAL const real* RESTRICT x, GLOBAL const real* RESTRICT scale,
                           GLOBAL const real* RESTRICT bias, GLOBAL real* RESTRICT y, int rows,
                           int D, float eps)
{
    int r = GID(0);
    if (r >= rows) return;
    int base = r * D;
    float mean = 0.0f, var = 0.0f;
    for (int d = 0; d < D; ++d) mean += LD(x, base + d);
    mean /= (float)D;
    for (int d = 0; d < D; ++d) { float v = LD(x, base + d) - mean; var += v * v; }
    float inv = 1.0f / sqrt(var / (float)D + eps);
    for (int d = 0; d < D; ++d) {
        float v = (LD(x, base + d) - mean) * inv * LD(scale, d);
        ST(y, base + d, bias ? v + LD(bias, d) : v);
    }
}
