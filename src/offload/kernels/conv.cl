/* conv.cl: conv2d pieces. General convs gather patches (im2col) and multiply them with the
 * weights in gemm.cl; depthwise convs run directly here. NCHW float32 throughout. */
#include "common.h"

/* cols[n][g][(ci, ky, kx)][oy * OW + ox] = x[n][g * CG + ci][iy][ix] (0 outside the input), with
 * iy = oy * SH - PT + ky * DH, ix = ox * SW - PL + kx * DW. One work-item per cols element;
 * launch over N * C * KH * KW * OH * OW elements (C = G * CG, so (g, ci) is just the channel). */
KERNEL void im2col(GLOBAL const float* RESTRICT x, GLOBAL float* RESTRICT cols, int total,
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
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = x[((n * C + c) * H + iy) * W + ix];
    cols[i] = v;
}

/* Depthwise conv (one input channel per output channel) with the fused epilogue: bias (may be
 * absent), residual R (NCHW like y, may be absent), activation. One work-item per output. */
KERNEL void depthwise_conv(GLOBAL const float* RESTRICT x, GLOBAL const float* RESTRICT w,
                           GLOBAL const float* RESTRICT bias, GLOBAL const float* RESTRICT R,
                           GLOBAL float* RESTRICT y, int total,
                           int C, int H, int W, int KH, int KW, int OH, int OW,
                           int SH, int SW, int PT, int PL, int DH, int DW,
                           int act, float alpha, float lo, float hi)
{
    int i = GID(0);
    if (i >= total) return;
    int ox = i % OW; int r = i / OW;
    int oy = r % OH; r /= OH;
    int c = r % C;   int n = r / C;
    GLOBAL const float* xc = x + (n * C + c) * H * W;
    GLOBAL const float* wc = w + c * KH * KW;
    float acc = 0.0f;
    for (int ky = 0; ky < KH; ++ky) {
        int iy = oy * SH - PT + ky * DH;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int ix = ox * SW - PL + kx * DW;
            if (ix >= 0 && ix < W) acc = MAD(xc[iy * W + ix], wc[ky * KW + kx], acc);
        }
    }
    if (bias) acc += bias[c];
    if (R) acc += R[i];
    y[i] = activate(acc, act, alpha, lo, hi);
}
