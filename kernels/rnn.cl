/* rnn.cl: the fused gates of one LSTM/GRU time step (drivers/_builders.py build_rnn).
 *
 * Per step the driver has already computed, with its matrix product, G = h @ R^T of every
 * direction into `g` [D, B, NG] (NG columns per row); XW = X @ W^T of every step is in `xw`
 * [D, T, B, GH] (GH = gates * H). One work-item per (direction d, batch row b, unit j): it reads
 * its gates, updates its own h (and c) in `hs`/`cs` [D, B, H] and writes its Y row. Steps past a
 * row's sequence length write zeros into Y[s] and keep the state (as onnxruntime): a reverse
 * direction runs t = len - 1 - s. Bias `bias` [D, 2 * GH] is ONNX's B (W bias, then R bias);
 * `lens` (int) may be null (every row has T steps). The output `y` packs Y [T, D, B, H], Y_h
 * and (LSTM) Y_c as rows T and T + 1 (rnn_final). Lengths are not checked on the host here
 * (CUDA plans are captured graphs): one outside [0, T] gives NaN outputs for its row. */
#include "common.h"

#define NAN_F AS_FLOAT(0x7fc00000u)

DEVICE_FN float sigm(float x) { return 1.0f / (1.0f + EXP(-x)); }
DEVICE_FN float clipped(float x, float c) { return c > 0.0f ? FMIN(FMAX(x, -c), c) : x; }

/* State from initial_h / initial_c (null: zeros). */
KERNEL void rnn_init(GLOBAL const real* RESTRICT h0, GLOBAL const real* RESTRICT c0,
                     GLOBAL real* RESTRICT hs, GLOBAL real* RESTRICT cs, int total)
{
    int i = GID(0);
    if (i >= total) return;
    ST(hs, i, h0 ? LD(h0, i) : 0.0f);
    if (cs) ST(cs, i, c0 ? LD(c0, i) : 0.0f);
}

/* Y_h (row T) and Y_c (row T + 1, when cs is not null) from the final state; zeros for a row
 * of length 0 (as onnxruntime). */
KERNEL void rnn_final(GLOBAL const real* RESTRICT hs, GLOBAL const real* RESTRICT cs,
                      GLOBAL const int* RESTRICT lens, GLOBAL real* RESTRICT y, int total,
                      int T, int B, int H)
{
    int i = GID(0);
    if (i >= total) return;
    int len = lens ? lens[(i / H) % B] : T;
    float h = len == 0 ? 0.0f : (len < 0 || len > T) ? NAN_F : LD(hs, i);
    ST(y, T * total + i, h);
    if (cs) ST(y, (T + 1) * total + i, len == 0 ? 0.0f : (len < 0 || len > T) ? NAN_F : LD(cs, i));
}

/* Where work-item i = (d, b, j) reads and writes at step s; 0 when the row is past its length
 * (Y[s] zeroed here). A length outside [0, T] (the cpu device raises a typed error) makes the
 * row's outputs NaN and reads nothing. */
DEVICE_FN int rnn_place(int i, int s, GLOBAL const int* lens, GLOBAL real* y, int T, int B, int H,
                        int D, int dir, int* d_, int* b_, int* j_, int* t_)
{
    int j = i % H, r = i / H, b = r % B, d = r / B;
    int len = lens ? lens[b] : T;
    *d_ = d; *b_ = b; *j_ = j;
    if (s >= len || len > T) {
        ST(y, ((s * D + d) * B + b) * H + j, (len < 0 || len > T) ? NAN_F : 0.0f);
        return 0;
    }
    int reverse = dir == 1 || (dir == 2 && d == 1);
    *t_ = reverse ? len - 1 - s : s;
    return 1;
}

/* LSTM, gates i, o, f, c; peepholes p [D, 3H] (i, o, f) may be null. */
KERNEL void lstm_step(GLOBAL const real* RESTRICT xw, GLOBAL const real* RESTRICT g,
                      GLOBAL const real* RESTRICT bias, GLOBAL const real* RESTRICT p,
                      GLOBAL const int* RESTRICT lens, GLOBAL real* RESTRICT hs,
                      GLOBAL real* RESTRICT cs, GLOBAL real* RESTRICT y, int total, int T,
                      int B, int H, int D, int dir, int s, float clip, int input_forget)
{
    int i = GID(0);
    if (i >= total) return;
    int d, b, j, t;
    if (!rnn_place(i, s, lens, y, T, B, H, D, dir, &d, &b, &j, &t)) return;
    const int GH = 4 * H;
    GLOBAL const real* x = xw + ((d * T + t) * B + b) * GH + j;
    GLOBAL const real* gr = g + (d * B + b) * GH + j;
    GLOBAL const real* wb = bias + d * 2 * GH + j;
    GLOBAL const real* rb = wb + GH;
    float pre[4];
    UNROLL for (int k = 0; k < 4; ++k)
        pre[k] = LD(x, k * H) + LD(gr, k * H) + LD(wb, k * H) + LD(rb, k * H);
    float cp = LD(cs, i);
    if (p) {
        pre[0] += LD(p, d * 3 * H + j) * cp;
        pre[2] += LD(p, d * 3 * H + 2 * H + j) * cp;
    }
    float ig = sigm(clipped(pre[0], clip));
    float fg = input_forget ? 1.0f - ig : sigm(clipped(pre[2], clip));
    float cg = TANH(clipped(pre[3], clip));
    float cn = fg * cp + ig * cg;
    float og = pre[1];
    if (p) og += LD(p, d * 3 * H + H + j) * cn;
    og = sigm(clipped(og, clip));
    float hn = og * TANH(cn);
    ST(cs, i, cn);
    ST(hs, i, hn);
    ST(y, ((t * D + d) * B + b) * H + j, hn);
}

/* GRU with linear_before_reset = 1: g [D, B, 3H] = h @ R^T (z, r, h). */
KERNEL void gru_step(GLOBAL const real* RESTRICT xw, GLOBAL const real* RESTRICT g,
                     GLOBAL const real* RESTRICT bias, GLOBAL const int* RESTRICT lens,
                     GLOBAL real* RESTRICT hs, GLOBAL real* RESTRICT y, int total, int T, int B,
                     int H, int D, int dir, int s, float clip)
{
    int i = GID(0);
    if (i >= total) return;
    int d, b, j, t;
    if (!rnn_place(i, s, lens, y, T, B, H, D, dir, &d, &b, &j, &t)) return;
    const int GH = 3 * H;
    GLOBAL const real* x = xw + ((d * T + t) * B + b) * GH + j;
    GLOBAL const real* gr = g + (d * B + b) * GH + j;
    GLOBAL const real* wb = bias + d * 2 * GH + j;
    GLOBAL const real* rb = wb + GH;
    float z = sigm(clipped(LD(x, 0) + LD(gr, 0) + LD(wb, 0) + LD(rb, 0), clip));
    float r = sigm(clipped(LD(x, H) + LD(gr, H) + LD(wb, H) + LD(rb, H), clip));
    float hc = TANH(clipped(LD(x, 2 * H) + LD(wb, 2 * H) + r * (LD(gr, 2 * H) + LD(rb, 2 * H)),
                            clip));
    float hn = (1.0f - z) * hc + z * LD(hs, i);
    ST(hs, i, hn);
    ST(y, ((t * D + d) * B + b) * H + j, hn);
}

/* GRU with linear_before_reset = 0, first half: g [D, B, 2H] = h @ R_zr^T; keeps z in zs and
 * r * h in rh [D, B, H] for the driver's product (r * h) @ R_h^T. */
KERNEL void gru_reset(GLOBAL const real* RESTRICT xw, GLOBAL const real* RESTRICT g,
                      GLOBAL const real* RESTRICT bias, GLOBAL const int* RESTRICT lens,
                      GLOBAL const real* RESTRICT hs, GLOBAL real* RESTRICT zs,
                      GLOBAL real* RESTRICT rh, GLOBAL real* RESTRICT y, int total, int T,
                      int B, int H, int D, int dir, int s, float clip)
{
    int i = GID(0);
    if (i >= total) return;
    int d, b, j, t;
    if (!rnn_place(i, s, lens, y, T, B, H, D, dir, &d, &b, &j, &t)) {
        ST(rh, i, 0.0f);
        return;
    }
    const int GH = 3 * H;
    GLOBAL const real* x = xw + ((d * T + t) * B + b) * GH + j;
    GLOBAL const real* gr = g + (d * B + b) * 2 * H + j;
    GLOBAL const real* wb = bias + d * 2 * GH + j;
    GLOBAL const real* rb = wb + GH;
    float z = sigm(clipped(LD(x, 0) + LD(gr, 0) + LD(wb, 0) + LD(rb, 0), clip));
    float r = sigm(clipped(LD(x, H) + LD(gr, H) + LD(wb, H) + LD(rb, H), clip));
    ST(zs, i, z);
    ST(rh, i, r * LD(hs, i));
}

/* GRU with linear_before_reset = 0, second half: gh [D, B, H] = (r * h) @ R_h^T. */
KERNEL void gru_update(GLOBAL const real* RESTRICT xw, GLOBAL const real* RESTRICT gh,
                       GLOBAL const real* RESTRICT bias, GLOBAL const int* RESTRICT lens,
                       GLOBAL const real* RESTRICT zs, GLOBAL real* RESTRICT hs,
                       GLOBAL real* RESTRICT y, int total, int T, int B, int H, int D, int dir,
                       int s, float clip)
{
    int i = GID(0);
    if (i >= total) return;
    int j = i % H, r_ = i / H, b = r_ % B, d = r_ / B;
    int len = lens ? lens[b] : T;
    if (s >= len || len > T) return;  /* Y[s] was written by gru_reset */
    int reverse = dir == 1 || (dir == 2 && d == 1);
    int t = reverse ? len - 1 - s : s;
    const int GH = 3 * H;
    GLOBAL const real* x = xw + ((d * T + t) * B + b) * GH + j;
    GLOBAL const real* wb = bias + d * 2 * GH + j;
    GLOBAL const real* rb = wb + GH;
    float hc = TANH(clipped(LD(x, 2 * H) + LD(wb, 2 * H) + LD(gh, i) + LD(rb, 2 * H), clip));
    float z = LD(zs, i);
    float hn = (1.0f - z) * hc + z * LD(hs, i);
    ST(hs, i, hn);
    ST(y, ((t * D + d) * B + b) * H + j, hn);
}
