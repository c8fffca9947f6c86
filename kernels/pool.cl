/* pool.cl: max and average pooling over NCHW windows (global average pooling is a row mean in
 * reduce.cl). One work-item per output element. */
#include "common.h"

/* Max pooling: windows clipped to the input (padding and ceil-mode overhang never win). */
KERNEL void maxpool(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int total,
                    int H, int W, int KH, int KW, int OH, int OW,
                    int SH, int SW, int PT, int PL, int DH, int DW)
{
    int i = GID(0);
    if (i >= total) return;
    int ox = i % OW; int r = i / OW;
    int oy = r % OH; int nc = r / OH;
    GLOBAL const real* xc = x + nc * H * W;
    float m = -INF_F;
    for (int ky = 0; ky < KH; ++ky) {
        int iy = oy * SH - PT + ky * DH;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int ix = ox * SW - PL + kx * DW;
            if (ix >= 0 && ix < W) m = max_nan(m, LD(xc, iy * W + ix));
        }
    }
    ST(y, i, m);
}

/* Average pooling: the sum over the input positions of the window divided by the count of
 * input positions, or with count_include_pad by the count of positions before the end pad
 * (PB, PR) -- ceil-mode overhang past the end pad is never counted (as ONNX). */
KERNEL void avgpool(GLOBAL const real* RESTRICT x, GLOBAL real* RESTRICT y, int total,
                    int H, int W, int KH, int KW, int OH, int OW,
                    int SH, int SW, int PT, int PL, int DH, int DW, int PB, int PR,
                    int include_pad)
{
    int i = GID(0);
    if (i >= total) return;
    int ox = i % OW; int r = i / OW;
    int oy = r % OH; int nc = r / OH;
    GLOBAL const real* xc = x + nc * H * W;
    float s = 0.0f;
    int ny = 0, nx = 0;
    for (int ky = 0; ky < KH; ++ky) {
        int iy = oy * SH - PT + ky * DH;
        if (include_pad ? iy < H + PB : (iy >= 0 && iy < H)) ++ny;
    }
    for (int kx = 0; kx < KW; ++kx) {
        int ix = ox * SW - PL + kx * DW;
        if (include_pad ? ix < W + PR : (ix >= 0 && ix < W)) ++nx;
    }
    for (int ky = 0; ky < KH; ++ky) {
        int iy = oy * SH - PT + ky * DH;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int ix = ox * SW - PL + kx * DW;
            if (ix >= 0 && ix < W) s += LD(xc, iy * W + ix);
        }
    }
    ST(y, i, s / (float)(ny * nx));
}
