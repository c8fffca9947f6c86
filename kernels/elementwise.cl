/* elementwise.cl: bias/activation epilogue, activation, binary ops with broadcasting (rank <= 6), pad, transpose, concat. */
#include "common.h"

/* In place after a library matrix product (CUDA: cuBLAS), y viewed as [outer, C, inner]:
   y = act(y + bias[c] + R); bias and R may be null. */
KERNEL void bias_act(GLOBAL real* RESTRICT y, GLOBAL const real* RESTRICT bias,
                     GLOBAL const real* RESTRICT R, int total, int C, int inner,
                     int act, float alpha, float lo, float hi)
{
    int i = GID(0);
    if (i >= total) return;
    float v = LD(y, i);
    if (bias) v += LD(bias, (i / inner) % C);
    if (R) v += LD(R, i);
    ST(y, i, activate(v, act, alpha, lo, hi));
}

/* y[i] = fn(x[i]) */
KERNEL void activation(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int n,
                       int act, float alpha, float lo, float hi)
{
    int i = GID(0);
    if (i < n) ST(y, i, activate(LD(x, i), act, alpha, lo, hi));
}

/* Binary op codes. */
#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3

DEVICE_FN float binary_op(float a, float b, int op)
{
    switch (op) {
    case OP_ADD: return a + b;
    case OP_SUB: return a - b;
    case OP_MUL: return a * b;
    default: return a / b;
    }
}

/* y = a op b for same-shape operands. */
KERNEL void binary_same(GLOBAL const real* RESTRICT a, GLOBAL const real* RESTRICT b,
                        GLOBAL real* RESTRICT y, int n, int op)
{
    int i = GID(0);
    if (i < n) ST(y, i, binary_op(LD(a, i), LD(b, i), op));
}

/* y = a op b broadcast: out dims d0..d5 (rank padded to 6 with leading 1s), element strides
 * of a and b per axis (0 on a broadcast axis). */
KERNEL void binary_bcast(GLOBAL const real* RESTRICT a, GLOBAL const real* RESTRICT b,
                         GLOBAL real* RESTRICT y, int n, int op,
                         int d0, int d1, int d2, int d3, int d4, int d5,
                         int a0, int a1, int a2, int a3, int a4, int a5,
                         int b0, int b1, int b2, int b3, int b4, int b5)
{
    int i = GID(0);
    if (i >= n) return;
    int r = i, ia = 0, ib = 0, c;
    c = r % d5; r /= d5; ia += c * a5; ib += c * b5;
    c = r % d4; r /= d4; ia += c * a4; ib += c * b4;
    c = r % d3; r /= d3; ia += c * a3; ib += c * b3;
    c = r % d2; r /= d2; ia += c * a2; ib += c * b2;
    c = r % d1; r /= d1; ia += c * a1; ib += c * b1;
    c = r % d0;          ia += c * a0; ib += c * b0;
    ST(y, i, binary_op(LD(a, ia), LD(b, ib), op));
}

/* General strided gather y[i] = x[sum_k coord_k(i) * s_k] (rank <= 6), or `value` where an
 * out coordinate falls outside [lo_k, lo_k + n_k): transpose (perm as strides), pad and crop
 * (x offset `base` may be computed for negative begins), and concat slabs. */
KERNEL void gather6(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int n, int base,
                    float value,
                    int d0, int d1, int d2, int d3, int d4, int d5,
                    int s0, int s1, int s2, int s3, int s4, int s5,
                    int l0, int l1, int l2, int l3, int l4, int l5,
                    int n0, int n1, int n2, int n3, int n4, int n5)
{
    int i = GID(0);
    if (i >= n) return;
    int r = i, ix = base, c;
    bool inside = true;
    c = r % d5; r /= d5; c -= l5; inside = inside && c >= 0 && c < n5; ix += c * s5;
    c = r % d4; r /= d4; c -= l4; inside = inside && c >= 0 && c < n4; ix += c * s4;
    c = r % d3; r /= d3; c -= l3; inside = inside && c >= 0 && c < n3; ix += c * s3;
    c = r % d2; r /= d2; c -= l2; inside = inside && c >= 0 && c < n2; ix += c * s2;
    c = r % d1; r /= d1; c -= l1; inside = inside && c >= 0 && c < n1; ix += c * s1;
    c = r % d0;          c -= l0; inside = inside && c >= 0 && c < n0; ix += c * s0;
    ST(y, i, inside ? LD(x, ix) : value);
}

/* Concat part: x viewed as [outer, inner] copied into y viewed as [outer, y_inner] at column
 * `offset`. */
KERNEL void concat_part(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int n,
                        int inner, int y_inner, int offset)
{
    int i = GID(0);
    if (i >= n) return;
    int o = i / inner, j = i - o * inner;
    ST(y, o * y_inner + offset + j, LD(x, i));
}
