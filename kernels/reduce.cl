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
