/* conv.cl: conv2d pieces. General convs gather patches (im2col) and multiply them with the
 * weights in gemm.cl; depthwise convs run directly here. NCHW throughout. */
#include "common.h"

/* cols[n][g][(ci, ky, kx)][oy * OW + ox] = x[n][g * CG + ci][iy][ix] (0 outside the input), with
 * iy = oy * SH - PT + ky * DH, ix = ox * SW - PL + kx * DW. One work-item per cols element;
 * launch over N * C * KH * KW * OH * OW elements (C = G * CG, so (g, ci) is just the channel). */
KERNEL void im2col(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT cols, int total,
                   int C, int H, int W, int KH, int KW, int OH, int OW,
                   int SH, int SW, int PT, int PL, int DH, int DW)
{
    int i = GID(0);
    if (i >= total) return;
    int ox = i % OW; int r = i / OW;
    int oy = r % OH; r /= OH;
    int kx = r % KW; r /= KW;
    int ky = r % KH; r /= KH;
    int c = r % C;   int n = r / C;
    int iy = oy * SH - PT + ky * DH, ix = ox * SW - PL + kx * DW;
    float v = 0.0f;
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = LD(x, ((n * C + c) * H + iy) * W + ix);
    ST(cols, i, v);
}

/* Depthwise conv (one input channel per output channel) with the fused epilogue: bias (may be
 * absent), residual R (NCHW like y, may be absent), activation. One work-item per output. */
KERNEL void depthwise_conv(GLOBAL const real* RESTRICT x, GLOBAL const real* RESTRICT w,
                           GLOBAL const real* RESTRICT bias, GLOBAL const real* RESTRICT R,
                           GLOBAL real* RESTRICT y, int total,
                           int C, int H, int W, int KH, int KW, int OH, int OW,
                           int SH, int SW, int PT, int PL, int DH, int DW,
                           int act, float alpha, float lo, float hi)
{
    int i = GID(0);
    if (i >= total) return;
    int ox = i % OW; int r = i / OW;
    int oy = r % OH; r /= OH;
    int c = r % C;   int n = r / C;
    GLOBAL const real* xc = x + (n * C + c) * H * W;
    GLOBAL const real* wc = w + c * KH * KW;
    float acc = 0.0f;
    for (int ky = 0; ky < KH; ++ky) {
        int iy = oy * SH - PT + ky * DH;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int ix = ox * SW - PL + kx * DW;
            if (ix >= 0 && ix < W) acc = MAD(LD(xc, iy * W + ix), LD(wc, ky * KW + kx), acc);
        }
    }
    if (bias) acc += LD(bias, c);
    if (R) acc += LD(R, i);
    ST(y, i, activate(acc, act, alpha, lo, hi));
}
