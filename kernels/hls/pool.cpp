// Pooling, k x k window, stride k, no padding (ho = height / k, wo = width / k), NCHW.
// The batch loop inside the kernel: one run per batch. x: DATA_T raw, y: OUT_T raw.
//   maxpool2d: y = OUT_T(max over the window)
//   avgpool2d: acc = 0; acc += ACC_T(x) over the window in (r, s) order;
//              y = OUT_T(acc / (k*k)), the division exact: k*k must be 2^shift, shift <= 4.
#include "offload_hls.h"

extern "C" void maxpool2d(const data_s* x, out_s* y, int batch, int channels, int height,
                          int width, int k) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 65536
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem1 depth = 16384
#pragma HLS INTERFACE s_axilite port = x bundle = control
#pragma HLS INTERFACE s_axilite port = y bundle = control
#pragma HLS INTERFACE s_axilite port = batch bundle = control
#pragma HLS INTERFACE s_axilite port = channels bundle = control
#pragma HLS INTERFACE s_axilite port = height bundle = control
#pragma HLS INTERFACE s_axilite port = width bundle = control
#pragma HLS INTERFACE s_axilite port = k bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control
  if (batch < 1 || channels < 1 || k < 1 || height < k || width < k) return;
  const int ho = height / k, wo = width / k;
planes:
  for (long p = 0; p < (long)batch * channels; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 32768
    const data_s* xp = x + p * height * width;
  rows:
    for (int i = 0; i < ho; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    cols:
      for (int j = 0; j < wo; ++j) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
        data_t m = fx_load<data_t>(xp[(i * k) * width + j * k]);
      win:
        for (int r = 0; r < k; ++r) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 4
          for (int s = 0; s < k; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 4
#pragma HLS PIPELINE II = 1
            data_t v = fx_load<data_t>(xp[(i * k + r) * width + j * k + s]);
            if (v > m) m = v;
          }
        }
        out_t o = m;
        y[(p * ho + i) * wo + j] = fx_store_raw<out_t>(o);
      }
    }
  }
}

extern "C" void avgpool2d(const data_s* x, out_s* y, int batch, int channels, int height,
                          int width, int k) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 65536
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem1 depth = 16384
#pragma HLS INTERFACE s_axilite port = x bundle = control
#pragma HLS INTERFACE s_axilite port = y bundle = control
#pragma HLS INTERFACE s_axilite port = batch bundle = control
#pragma HLS INTERFACE s_axilite port = channels bundle = control
#pragma HLS INTERFACE s_axilite port = height bundle = control
#pragma HLS INTERFACE s_axilite port = width bundle = control
#pragma HLS INTERFACE s_axilite port = k bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control
  if (batch < 1 || channels < 1 || k < 1 || height < k || width < k) return;
  int shift = 0;
  while ((1 << shift) < k * k) ++shift;
  if ((1 << shift) != k * k || shift > POOL_MAX_SHIFT) return;
  const int ho = height / k, wo = width / k;
planes:
  for (long p = 0; p < (long)batch * channels; ++p) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 32768
    const data_s* xp = x + p * height * width;
  rows:
    for (int i = 0; i < ho; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
    cols:
      for (int j = 0; j < wo; ++j) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 64
        acc_t acc = 0;
      win:
        for (int r = 0; r < k; ++r) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 4
          for (int s = 0; s < k; ++s) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 4
#pragma HLS PIPELINE II = 1
            acc_t v = fx_load<data_t>(xp[(i * k + r) * width + j * k + s]);
            acc += v;
          }
        }
        avg_t a = acc;  // exact: more integer and fractional bits
        a >>= shift;    // exact: shift <= POOL_MAX_SHIFT spare fractional bits
        out_t o = a;
        y[(p * ho + i) * wo + j] = fx_store_raw<out_t>(o);
      }
    }
  }
}
