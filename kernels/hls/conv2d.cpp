// 2-D convolution (+bias, optional ReLU), stride 1, symmetric zero padding `pad`, NCHW/OIHW.
// The batch loop inside the kernel: one run per batch.
//   x [batch, c_in, height, width] (DATA_T raw)   w [c_out, c_in, kh, kw] (WEIGHT_T raw)
//   b [c_out] (BIAS_T raw)                        y [batch, c_out, ho, wo] (OUT_T raw)
//   ho = height + 2*pad - kh + 1, wo = width + 2*pad - kw + 1
// Per event, output channel o and pixel (i, j):
//   acc = ACC_T(b[o]); for c, r, s in C order: if the tap is inside the image,
//   acc += ACC_T(x[c][i+r-pad][j+s-pad] * w[o][c][r][s]);  y = OUT_T(relu && acc < 0 ? 0 : acc)
// (padding taps are skipped: adding an exact zero changes nothing).
#include "offload_hls.h"

extern "C" void conv2d(const data_s* x, const weight_s* w, const bias_s* b, out_s* y, int batch,
                       int c_in, int height, int width, int c_out, int kh, int kw, int pad,
                       int relu) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 65536
#pragma HLS INTERFACE m_axi port = w offset = slave bundle = gmem1 depth = 36864
#pragma HLS INTERFACE m_axi port = b offset = slave bundle = gmem1 depth = 128
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem0 depth = 65536
#pragma HLS INTERFACE s_axilite port = x bundle = control
#pragma HLS INTERFACE s_axilite port = w bundle = control
#pragma HLS INTERFACE s_axilite port = b bundle = control
#pragma HLS INTERFACE s_axilite port = y bundle = control
#pragma HLS INTERFACE s_axilite port = batch bundle = control
#pragma HLS INTERFACE s_axilite port = c_in bundle = control
#pragma HLS INTERFACE s_axilite port = height bundle = control
#pragma HLS INTERFACE s_axilite port = width bundle = control
#pragma HLS INTERFACE s_axilite port = c_out bundle = control
#pragma HLS INTERFACE s_axilite port = kh bundle = control
#pragma HLS INTERFACE s_axilite port = kw bundle = control
#pragma HLS INTERFACE s_axilite port = pad bundle = control
#pragma HLS INTERFACE s_axilite port = relu bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control
  const int ho = height + 2 * pad - kh + 1, wo = width + 2 * pad - kw + 1;
  const int n_w = c_out * c_in * kh * kw, n_x = c_in * height * width;
  if (batch < 1 || c_in < 1 || height < 1 || width < 1 || c_out < 1 || kh < 1 || kw < 1 ||
      pad < 0 || ho < 1 || wo < 1 || c_out > CONV_MAX_COUT || n_w > CONV_MAX_W ||
      n_x > CONV_MAX_IN)
    return;

  weight_t wbuf[CONV_MAX_W];
  acc_t bbuf[CONV_MAX_COUT];
  data_t xbuf[CONV_MAX_IN];

load_w:
  for (int i = 0; i < n_w; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 36864
#pragma HLS PIPELINE II = 1
    wbuf[i] = fx_load<weight_t>(w[i]);
  }
load_b:
  for (int o = 0; o < c_out; ++o) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 128
#pragma HLS PIPELINE II = 1
    bbuf[o] = fx_load<bias_t>(b[o]);
  }

events:
  for (int n = 0; n < batch; ++n) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
  load_x:
    for (int i = 0; i < n_x; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 32768
#pragma HLS PIPELINE II = 1
      xbuf[i] = fx_load<data_t>(x[(long)n * n_x + i]);
    }
    out_s* yn = y + (long)n * c_out * ho * wo;
  chans:
    for (int o = 0; o < c_out; ++o) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 128
    rows:
      for (int i = 0; i < ho; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
      cols:
        for (int j = 0; j < wo; ++j) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
          acc_t acc = bbuf[o];
        taps_c:
          for (int c = 0; c < c_in; ++c) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 32
          taps_r:
            for (int r = 0; r < kh; ++r) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 3
            taps_s:
              for (int s = 0; s < kw; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 3
#pragma HLS PIPELINE II = 1
                const int ii = i + r - pad, jj = j + s - pad;
                if (ii >= 0 && ii < height && jj >= 0 && jj < width) {
                  acc_t p = xbuf[(c * height + ii) * width + jj] *
                            wbuf[((o * c_in + c) * kh + r) * kw + s];
                  acc += p;
                }
              }
            }
          }
          if (relu && acc < 0) acc = 0;
          out_t v = acc;
          yn[(o * ho + i) * wo + j] = fx_store_raw<out_t>(v);
        }
      }
    }
  }
}
